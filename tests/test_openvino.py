"""OpenVINO: IR converted from the exported program, verified like every variant, bundled with both files checked,
loaded with the thread count asked for, served; bf16/f16 only where the CPU plugin runs them natively; NNCF int8."""
import numpy as np
import pytest

import openvino  # noqa: E402,F401  (the dev install has it: a broken install fails, never skips)

from torchship import Budget, OptimizeOptions, load_bundle, optimize  # noqa: E402
from torchship.zoo.digits import dataset  # noqa: E402


@pytest.fixture(scope="module")
def ov_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("ov") / "b"
    res = optimize("zoo:digits-cnn", OptimizeOptions(runtimes=("openvino",), batch_sizes=(1, 8), seconds_per_size=0.05,
                                                     transforms=()), out=out)
    return res, out


def test_an_openvino_variant_verifies_and_its_bundle_answers(ov_bundle):
    res, out = ov_bundle
    v = res.variant("openvino")
    assert v.status == "ok" and v.fidelity.cosine > 0.9999 and v.artifact.options.converted_from == "the torch.export program"
    loaded = load_bundle(out, threads=1)  # IR is data: no consent needed
    assert set(loaded.manifest.files) >= {"model.xml", "model.bin"} and loaded.manifest.executes is None
    assert loaded.runner.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert "float32" in str(loaded.runner.compiled.get_property("INFERENCE_PRECISION_HINT"))  # not the CPU's bf16 default
    x, y = dataset()["test"]
    for n in (1, 5, 64):  # batch sizes other than timed: the batch dimension is dynamic in the IR
        logits = loaded({"image": x[:n]})["logits"]
        assert logits.shape == (n, 10)
    assert (loaded({"image": x[:64]})["logits"].argmax(1) == y[:64]).mean() >= 0.95


def test_bf16_and_f16_only_where_the_plugin_runs_them(monkeypatch):
    import torchship.runtimes.openvino as ov
    from torchship.plan import plan
    from torchship.sources import load_source
    model = load_source("tests.models:Tiny")
    monkeypatch.setattr(ov, "capabilities", lambda: ("FP32", "INT8"))
    by = {v.name: v for v in plan(model, "cpu", ["openvino"], None, ("bf16",))}
    assert "no native BF16" in by["openvino-bf16"].skip and "no native FP16" in by["openvino-f16"].skip
    monkeypatch.setattr(ov, "capabilities", lambda: ("FP32", "BF16", "FP16"))
    by = {v.name: v for v in plan(model, "cpu", ["openvino"], None, ("bf16",))}
    assert by["openvino-bf16"].skip is None and by["openvino-f16"].skip is None


def test_an_onnx_source_runs_on_openvino_too(tmp_path):
    from torchship.runtimes.onnxrt import export_onnx
    from torchship.sources import load_source
    export_onnx(load_source("tests.models:Tiny"), tmp_path / "tiny.onnx")
    res = optimize(str(tmp_path / "tiny.onnx"), OptimizeOptions(runtimes=("onnxrt", "openvino"), batch_sizes=(4,),
                                                                seconds_per_size=0.02, transforms=()))
    v = res.variant("openvino")
    assert v.status == "ok" and v.artifact.options.converted_from == "the ONNX file"


@pytest.mark.slow
def test_nncf_int8_is_calibrated_and_held_to_the_budget(tmp_path):
    x, y = dataset()["test"]
    np.savez(tmp_path / "eval.npz", image=x[:200], labels=y[:200])
    res = optimize("zoo:digits-cnn", OptimizeOptions(runtimes=("openvino",), transforms=("int8",), batch_sizes=(16,),
                                                     seconds_per_size=0.05, budget=Budget.parse("accuracy_drop=0.01"),
                                                     exhaustive=True), eval_data=tmp_path / "eval.npz")
    v = res.variant("openvino+int8")
    assert v.status == "ok", v.reason
    assert v.fidelity.accuracy >= v.fidelity.reference_accuracy - 0.01 and v.fidelity.max_abs_error > 0  # really int8
    assert any("reported, not judged: calibrated ranges" in c for c in v.fidelity.checked)


def test_the_other_openvino_variants_start_from_the_plain_ones_ir(tmp_path, monkeypatch):
    """Converted once: a bf16 or int8 variant reads the plain variant's IR back, with what it was converted from and
    each operation's module path, instead of exporting and converting the model again (6-8 s each on MiniLM)."""
    from dataclasses import replace

    import torchship.runtimes._torch as torch_runtime
    import torchship.runtimes.onnxrt as onnxrt
    from torchship.runtimes import get
    from torchship.runtimes.base import BuildOptions
    from torchship.sources import load_source
    model = load_source("zoo:digits-cnn")
    for d in ("openvino", "openvino-bf16"):
        (tmp_path / d).mkdir()
    plain = get("openvino").build(model, BuildOptions(), tmp_path / "openvino")

    def converting(*_, **__):
        raise AssertionError("converted again")
    monkeypatch.setattr(torch_runtime, "export_dynamic", converting)
    monkeypatch.setattr(onnxrt, "export_onnx", converting)
    again = get("openvino").build(replace(model, converted=tmp_path / "openvino" / "model.xml"),
                                  BuildOptions(precision="bf16"), tmp_path / "openvino-bf16")
    assert again.options.converted_from == plain.options.converted_from == "the torch.export program"
    assert (tmp_path / "openvino-bf16" / "model.bin").read_bytes() == (tmp_path / "openvino" / "model.bin").read_bytes()
    assert not (tmp_path / "openvino-bf16" / "converted.json").exists()  # only the plain variant's is started from


@pytest.mark.slow
def test_an_openvino_bundle_serves(server, ov_bundle):
    import tritonclient.http as triton
    _, out = ov_bundle
    s = server(out)
    client = triton.InferenceServerClient(s.url)
    x = dataset()["test"][0][:3]
    inp = triton.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    got = client.infer("digits-cnn", [inp]).as_numpy("logits")
    np.testing.assert_allclose(got, load_bundle(out)({"image": x})["logits"], rtol=1e-5, atol=1e-5)


def test_the_fewest_layers_in_float_are_found_with_few_quantizations():
    """int8-mixed's search: the costliest k operations kept in float, k the least that holds (each try a
    quantization): 2, 4, 8, ... then bisection. Decided on injected verdicts, not on a model."""
    from torchship.runtimes.control import fewest
    for most in (1, 2, 7, 41):
        for need in range(1, most + 1):
            tried = []
            assert fewest(most, lambda k: tried.append(k) or k >= need) == need
            assert len(tried) <= 2 * int(np.ceil(np.log2(most + 1))) + 1, (most, need, tried)
        tried = []
        assert fewest(most, lambda k: tried.append(k) or False) is None and tried[-1] == most  # every k failed


def test_calibration_batches_of_tokens_are_cut_to_their_lengths_and_others_kept_as_they_are():
    """NNCF calibrates on token inputs cut to their lengths (items of neighbouring lengths together, batches of the
    same size): its statistics are then the tokens', not the padding's; inputs without a mask are left alone."""
    from torchship.runtimes.control import cut_batches
    lengths = np.random.default_rng(0).integers(1, 30, 40)
    mask = (np.arange(32)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask > 0, np.arange(1, 41)[:, None], 0)  # each item's own token
    batches = [{"input_ids": ids[i:i + 16], "attention_mask": mask[i:i + 16]} for i in range(0, 40, 16)]
    cut = cut_batches(batches)
    assert all(len(b["input_ids"]) <= 16 for b in cut) and sum(len(b["input_ids"]) for b in cut) == 40
    assert all(b["attention_mask"][:, -1].any() and b["input_ids"].shape[1] < 32 for b in cut)  # cut to their longest
    assert sorted(int(b["input_ids"][i, 0]) for b in cut for i in range(len(b["input_ids"]))) == list(range(1, 41))
    images = [{"x": np.ones((16, 3, 4, 4), np.float32)}, {"x": np.zeros((8, 3, 4, 4), np.float32)}]
    assert [b["x"].shape for b in cut_batches(images)] == [(16, 3, 4, 4), (8, 3, 4, 4)]


def test_where_the_ranking_items_are_all_the_calibration_items_the_plain_model_is_not_measured_again():
    """Costs are ranked on the first calibration items (NNCF's ranking subset); where those are all of them (MiniLM:
    64), what the plain model kept on all of them is its measure there too, not one more compile and run."""
    from torchship.runtimes.control import Control
    control = object.__new__(Control)  # what on_ranking reads of it; nothing is run
    control.ranks_on_all = True
    control.kept = lambda candidate, ranking=False: pytest.fail("measured again")
    assert control.on_ranking("plain", {"cosine": 0.99}) == {"cosine": 0.99}
    control.ranks_on_all = False  # the first items only: measured there
    control.kept = lambda candidate, ranking=False: {"cosine": 0.98 if ranking else 0.99}
    assert control.on_ranking("plain", {"cosine": 0.99}) == {"cosine": 0.98}


def test_default_nncf_is_not_built_for_a_transformer_and_the_mixed_one_keeps_the_budget(tmp_path):
    """NNCF's default preset breaks attention (cosine 0.6 on MiniLM): for a model with attention it is a skipped row
    with the reason, and int8 with accuracy control is planned with the budget's floors in force; a plain MLP plans the
    default preset and neither transformer one."""
    from tests._text import bert_dir
    from torchship.optimize import floors
    from torchship.plan import NO_FLOORS, plan
    from torchship.sources import load_source
    bert = load_source(str(bert_dir(tmp_path / "bert")))
    by = {v.name: v for v in plan(bert, "cpu", ["openvino"], None, ("int8",), floors={"retrieval": 0.95})}
    assert "NNCF's default preset" in by["openvino+int8"].skip and by["openvino+int8-transformer"].skip is None
    assert by["openvino+int8-mixed"].skip is None and by["openvino+int8-mixed"].options.floors == {"retrieval": 0.95}
    assert plan(bert, "cpu", ["openvino"], None, ("int8",))[-1].skip == NO_FLOORS  # a budget by accuracy only
    tiny = {v.name: v for v in plan(load_source("tests.models:Tiny"), "cpu", ["openvino"], None, ("int8",), floors={"cosine": 0.999})}
    assert tiny["openvino+int8"].skip is None and not {"openvino+int8-transformer", "openvino+int8-mixed"} & set(tiny)
    # the floors handed on are the budget's in force for the model: retrieval for an embedding model only
    from dataclasses import replace
    embed = replace(bert, task="embed")
    assert floors(OptimizeOptions(), embed) == floors(OptimizeOptions(), bert) == {"cosine": 0.999}
    assert floors(OptimizeOptions(budget=Budget.parse("retrieval=0.95")), embed) == {"retrieval": 0.95}
    assert floors(OptimizeOptions(budget=Budget.parse("retrieval=0.95")), bert) == {"cosine": 0.999}
    assert floors(OptimizeOptions(budget=Budget.parse("cosine=0.99,retrieval=0.9")), embed) == {"cosine": 0.99, "retrieval": 0.9}


def test_int8_with_accuracy_control_keeps_the_fewest_costliest_operations_in_float(monkeypatch):
    """The decision, on injected measurements: each operation's share of the error is scripted; the build keeps
    in float the costliest ones, as few as hold the floor (with its margin), says which, and skips when only all
    in float would hold. The recipe that keeps more (full, or plain: no SmoothQuant, no bias correction) is the one
    searched, and a plain recipe that holds by itself is taken whole."""
    from types import SimpleNamespace

    import torchship.runtimes.control as control_module
    import torchship.runtimes.openvino as ov
    from torchship.errors import BuildSkipped
    from torchship.runtimes.base import BuildOptions
    error = {"a": 0.0001, "b": 0.0012, "c": 0.0003, "d": 0.0006, "e": 0.0002}  # 1 - cosine each adds in int8
    quantized, plain_cost = [], [1.0]  # the plain recipe's errors are the full one's times this

    class Fake:
        def __init__(self, in_float=frozenset(), plain=False):
            self.in_float, self.plain = frozenset(in_float), plain

    class Control:
        def __init__(self, ov_model, model, options, precision):
            self.targets = {k: v + control_module.MIXED_MARGIN * (1 - v) for k, v in options.floors.items()}
            self.floors, self.raw = options.floors, []

        def kept(self, m, ranking=False):
            scale = plain_cost[0] if m.plain else 1.0
            return {"cosine": 1 - scale * sum(e for n, e in error.items() if n not in m.in_float)}

        def on_ranking(self, m, kept):
            return self.kept(m, ranking=True)

        def room(self, kept):
            return kept["cosine"] - self.targets["cosine"]

    def quantize(ov_model, model, options, ignored=(), plain=False):
        quantized.append((tuple(ignored), plain))
        return Fake(ignored, plain)
    monkeypatch.setattr(ov, "_Control", Control)
    monkeypatch.setattr(ov, "_quantize", quantize)
    monkeypatch.setattr(ov, "_quantized_ops", lambda q, original: list(error))
    monkeypatch.setattr(ov, "_in_float", lambda q, names, original: Fake(names, q.plain))
    weights = dict.fromkeys(error, 0.2)  # each operation's share of the matrix weights
    monkeypatch.setattr(ov, "_shares", lambda names, original: {n: weights[n] for n in names})
    monkeypatch.setattr(ov, "capabilities", lambda: ("FP32", "BF16"))
    monkeypatch.setattr("torchship.machine.cpu", lambda: ("a CPU without AMX", frozenset({"avx512_bf16"})))
    paths = {n: f"encoder.layer.{i}.output.dense" for i, n in enumerate(error)}
    model = SimpleNamespace(spec=None)
    mixed = lambda floor: ov._mixed(None, model, BuildOptions(quantize="int8_mixed", floors={"cosine": floor}), paths)  # noqa: E731
    # floor 0.9985, target 0.99895: all in int8 keeps 0.9976, b out 0.9988, b and d out (the costliest two) 0.9994
    _, precision, layout = mixed(0.9985)
    assert precision == "bf16" and layout.startswith("int8 on 3 of the 5 operations it reaches; in bf16, costliest first: "
                                                     "layer.1.output.dense, layer.3.output.dense"), layout
    assert quantized == [((), False), ((), True), (("b", "d", "c", "e"), False), (("b", "d"), False), (("b",), False)]
    # full, plain (for the costs), then the full recipe with all but the cheapest left out (holds: there is int8 to
    # gain), the costliest 2 (holds), and 1 (bisection: does not)
    # floor 0.9999: only every one in float would hold -> a skipped row that says so, after one quantization more
    quantized.clear()
    with pytest.raises(BuildSkipped, match="every operation int8 reaches would have to stay in float"):
        mixed(0.9999)
    assert quantized == [((), False), ((), True), (("b", "d", "c", "e"), False)]
    # a floor the full int8 holds: nothing in float
    assert mixed(0.99)[2].startswith("int8 on every operation")
    # the plain recipe loses less (as on short text, where SmoothQuant fitted to long sentences hurts): it is searched
    plain_cost[0] = 0.6
    quantized.clear()
    _, _, layout = mixed(0.9985)  # plain: all 0.99856, b out 0.99928 (holds)
    assert quantized == [((), False), ((), True), (("b", "d", "c", "e"), True), (("b", "d"), True), (("b",), True)]
    assert layout.startswith("int8 on 4 of the 5 operations it reaches (without SmoothQuant and bias correction, "
                             "which cost it more); in bf16, costliest first: encoder.layer.1.output.dense (cosine"), layout
    _, _, layout = mixed(0.9995)  # most in float (b, d, c: e and a add 0.00018, under 0.00035): int8's are named
    assert layout.startswith("int8 on 2 of the 5 operations it reaches (without SmoothQuant and bias correction, "
                             "which cost it more); those: layer.4.output.dense, layer.0.output.dense; the other 3 in "
                             "bf16 (cosine"), layout
    _, _, layout = mixed(0.9975)  # plain holds by itself (target 0.99825), the full recipe not: taken whole
    assert layout.startswith("int8 on every operation the transformer preset quantizes, without SmoothQuant"), layout

    # the same floor where the two left in int8 (e, a) carry 10% of the matrix weights: int8 over bf16 (2x a layer at
    # most) gains at most 1.05x there, under MIXED_GAIN: not built, after one quantization with c, e, a in int8
    weights.update(a=0.02, b=0.5, c=0.2, d=0.2, e=0.08)
    quantized.clear()
    with pytest.raises(BuildSkipped, match=r"at least 3 of the 5 operations .* keep 10% of the matrix weights, at "
                                           r"most 1\.05x over bf16 alone, under the 1\.1x"):
        mixed(0.9995)
    assert quantized[2:] == [(("b", "d"), True)]
    # the same on a CPU with AMX (int8 and bf16 layers both twice as fast: the same 2x between them)
    monkeypatch.setattr("torchship.machine.cpu", lambda: ("a CPU with AMX", frozenset({"amx_int8", "amx_bf16"})))
    with pytest.raises(BuildSkipped, match=r"at most 1\.05x over bf16 alone"):
        mixed(0.9995)
    weights.update(dict.fromkeys(error, 0.2))

    # under a task-metric budget raw input's floor follows the candidate's own error (tighter as more is in float):
    # holding is then not monotone, so the least int8 is not tried first; 2 in float hold here, 4 and more do not (the
    # costs all alike: the order as listed)
    class Retrieval(Control):
        def kept(self, m, ranking=False):
            return {"retrieval": 1.0 if 2 <= len(m.in_float) <= 3 else 0.0}

        def room(self, kept):
            return kept["retrieval"] - 0.5
    monkeypatch.setattr(ov, "_Control", Retrieval)
    quantized.clear()
    _, _, layout = ov._mixed(None, model, BuildOptions(quantize="int8_mixed", floors={"retrieval": 0.95}), paths)
    assert quantized[2:] == [(("a", "b"), False), (("a",), False)] and layout.startswith("int8 on 3 of the 5"), layout


@pytest.mark.slow
def test_int8_with_accuracy_control_builds_on_a_small_transformer(tmp_path, monkeypatch):
    """On a real (small, random) BERT: the operations int8 reaches are each Linear and attention, named by module;
    putting them all back in float on the plain quantization gives the float model's answers again (the graph
    surgery the costs are measured with); the build holds the default floor and its bundle answers."""
    from dataclasses import replace

    import torchship.runtimes.control as control_module
    import torchship.runtimes.openvino as ov
    from tests._text import bert_dir
    from torchship.runtimes.base import BuildOptions, LoadContext, get
    from torchship.similarity import cosines
    from torchship.sources import load_source
    from torchship.sources.hf import tokenize
    from torchship.zoo.minilm import sentences
    model = load_source(str(bert_dir(tmp_path / "bert")), dims={"seq": 24})
    data = tokenize(model.tokenizer, sentences(64, seed=1), 24)
    data = {n: data.get(n, np.zeros_like(data["input_ids"])) for n in model.spec.input_names}  # token_type_ids
    model = replace(model, calibration_data=data)
    options = BuildOptions(quantize="int8_mixed", floors={"cosine": 0.999})
    original, _, paths = ov._convert(model, tmp_path)
    plain = ov._quantize(original, model, options, plain=True)
    found = ov._quantized_ops(plain, original)
    names = [paths.get(n.split("/")[0], n) for n in found]
    for wanted in (f"encoder.layer.{i}.{m}" for i in (0, 1) for m in ("attention.self.query", "attention.output.dense",
                                                                        "intermediate.dense", "output.dense")):
        assert any(n.endswith(wanted) for n in names), (wanted, names)
    # each operation's share of the matrix weights: the FFN's projections 2x an attention projection's (intermediate
    # size 2x hidden in this config), the embedding tables nothing
    share = ov._shares(found, original)
    by_path = {paths.get(n.split("/")[0], n): v for n, v in share.items()}
    query = next(v for k, v in by_path.items() if k.endswith("layer.0.attention.self.query"))
    ffn = next(v for k, v in by_path.items() if k.endswith("layer.0.intermediate.dense"))
    assert abs(sum(share.values()) - 1) < 1e-9 and ffn == pytest.approx(2 * query) and query > 0
    assert all(v == 0 for k, v in by_path.items() if "embeddings" in k)
    control = ov._Control(original, model, options, "fp32")
    first = model.spec.output_names[0]
    assert control.kept(plain)["cosine"] < 1 - 1e-7  # int8 changes the answers ...
    restored, _ = control.outputs(ov._in_float(plain, set(found), original), "fp32")
    assert np.abs(restored - control.reference).max() < 1e-4  # ... and all back in float gives them again
    monkeypatch.setattr(control_module, "RANKING_ITEMS", 20)  # operations are ranked on the first items only
    ranking = ov._Control(original, model, options, "fp32")
    ranked, _ = ranking.outputs(plain, "fp32", ranking=True)
    assert len(ranked) == 20 < len(ranking.reference)
    assert ranking.kept(plain, ranking=True)["cosine"] == pytest.approx(cosines(ranking.reference[:20], ranked).mean(),
                                                                         abs=1e-6)
    # with raw input (short, empty and other-script text, padded to the longest): each item is held to the budget's
    # cosine floor, or under a retrieval budget to the one the candidate's own error allows
    from torchship.processing.build import HARD_TEXT
    from torchship.similarity import extra_cosine
    raw = tokenize(model.tokenizer, list(HARD_TEXT.values()), 24)
    model = replace(model, raw_data={n: raw.get(n, np.zeros_like(raw["input_ids"])) for n in model.spec.input_names})
    grouped = ov._Control(original, model, options, "fp32")
    kept = grouped.kept(plain)
    # raw input runs in groups of neighbouring lengths, each cut to its longest, with the same answers as one batch
    assert len(grouped.raw) > 1 and max(f["input_ids"].shape[1] for _, f, _ in grouped.raw) == raw["input_ids"].shape[1]
    assert min(f["input_ids"].shape[1] for _, f, _ in grouped.raw) < raw["input_ids"].shape[1]
    # calibration sentences of mixed lengths run cut to their lengths (in groups of neighbouring ones), not padded
    short = tokenize(model.tokenizer, [" ".join(s.split()[:1 + i % 4]) for i, s in enumerate(sentences(64, seed=1))], 24)
    short = replace(model, calibration_data={n: short.get(n, np.zeros_like(short["input_ids"])) for n in model.spec.input_names})
    cut = ov._Control(original, short, options, "fp32")
    widths = [f["input_ids"].shape[1] for _, f, _ in cut.batches]
    assert max(widths) == int(short.calibration_data["attention_mask"].sum(1).max()) and min(widths) < min(max(widths), 24)
    assert sorted(np.concatenate([i for i, _, _ in cut.batches]).tolist()) == list(range(64))
    one = lambda feeds, groups=1: [(np.arange(len(feeds["input_ids"])), feeds, feeds["input_ids"].shape[1])]  # noqa: E731
    monkeypatch.setattr(control_module, "by_length", one)
    whole = ov._Control(original, model, options, "fp32")
    assert len(whole.raw) == 1 and np.abs(whole.raw_reference - grouped.raw_reference).max() < 1e-4
    assert kept["raw"] == pytest.approx(whole.kept(plain)["raw"], abs=1e-5)
    # ... with the answers they give padded, and the same measure
    padded = ov._Control(original, short, options, "fp32")
    assert len({f["input_ids"].shape[1] for _, f, _ in padded.batches}) == 1
    assert np.abs(padded.reference - cut.reference).max() < 1e-4
    assert cut.kept(plain)["cosine"] == pytest.approx(padded.kept(plain)["cosine"], abs=1e-5)
    assert kept["raw floor"] == 0.999 and 0 < kept["raw"] < 1 - 1e-7
    retrieval = ov._Control(original, model, options.found(floors={"retrieval": 0.9}), "fp32")
    kept = retrieval.kept(plain)
    own = float(np.linalg.norm(retrieval.outputs(plain, "fp32")[0] - retrieval.reference) / np.linalg.norm(retrieval.reference))
    assert kept["raw floor"] == pytest.approx(extra_cosine(own), abs=1e-6)
    assert retrieval.room(kept) <= kept["raw"] - kept["raw floor"]
    (tmp_path / "built").mkdir()
    artifact = get("openvino").build(model, options, tmp_path / "built")
    assert artifact.options.layout.startswith("int8 on every operation"), artifact.options.layout
    runner = get("openvino").load(artifact, tmp_path / "built", model.spec, LoadContext(threads=1))
    assert cosines(control.reference, runner(data)[first]).mean() >= 0.999
