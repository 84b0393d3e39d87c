import torchship


def test_public_api_is_pinned():
    assert sorted(torchship.__all__) == sorted([
        "BatchConfig", "Budget", "BundleError", "Finding", "IOSpec", "MissingExtra", "Model", "OptimizeOptions",
        "OptimizeResult", "ServeConfig", "SourceError", "SpecError", "TensorSpec", "TorchshipError", "UsageError",
        "check", "create_app", "inspect", "load_bundle", "load_source", "optimize", "perf", "serve", "verify_bundle",
        "watch"])
    for name in torchship.__all__:
        assert hasattr(torchship, name)
    assert callable(torchship.inspect.watch) and callable(torchship.inspect.inspect)


def test_unknown_runtime_names_the_registered_ones():
    import pytest

    from torchship.runtimes import get
    with pytest.raises(torchship.UsageError, match="aoti, compile, eager, onnxrt, openvino, torchscript"):
        get("tensorrt")
