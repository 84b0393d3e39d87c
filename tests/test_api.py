import torchship


def test_public_api_is_pinned():
    assert sorted(torchship.__all__) == sorted([
        "Budget", "BundleError", "IOSpec", "MissingExtra", "Model", "OptimizeOptions", "OptimizeResult", "SourceError",
        "SpecError", "TensorSpec", "TorchshipError", "UsageError", "load_bundle", "load_source", "optimize",
        "verify_bundle"])
    for name in torchship.__all__:
        assert hasattr(torchship, name)


def test_unknown_runtime_names_the_registered_ones():
    import pytest

    from torchship.runtimes import get
    with pytest.raises(torchship.UsageError, match="aoti, compile, eager, onnxrt, torchscript"):
        get("tensorrt")
