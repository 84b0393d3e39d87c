"""Hugging Face directories by task, from small random-config models saved here: what loads (class, inputs, every
output), what is refused and why, and that the bundle answers like the model."""
import numpy as np
import pytest
import torch

import transformers as tf  # noqa: E402  (the dev install has the nlp extra: a broken one fails, never skips)

from torchship import OptimizeOptions, SourceError, load_bundle, load_source, optimize  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _models():
    return {
        "bert": lambda: tf.BertModel(tf.BertConfig(vocab_size=100, max_position_embeddings=64, **SMALL)),
        "t5enc": lambda: tf.T5EncoderModel(tf.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=2)),
        "vit": lambda: tf.ViTForImageClassification(tf.ViTConfig(image_size=32, patch_size=8, num_labels=5, **SMALL)),
        "resnet": lambda: tf.ResNetForImageClassification(tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16],
                                                                          depths=[1, 1], num_labels=4)),
        "wav2vec2": lambda: tf.Wav2Vec2Model(tf.Wav2Vec2Config(conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 8),
                                                               num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
                                                               vocab_size=10, **SMALL)),
        "t5": lambda: tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                                                num_heads=2, decoder_start_token_id=0)),
    }


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    out = {}
    for name, make in _models().items():
        make().eval().save_pretrained(root / name)
        out[name] = root / name
    return out


EXPECTED = {  # inputs and outputs as loaded, from the class each directory was saved with
    "bert": ("input_ids:int64[batch,seq]{0:100}", ["last_hidden_state", "pooler_output"], "other"),
    "t5enc": ("input_ids:int64[batch,seq]{0:100}", ["last_hidden_state"], "other"),
    "gpt2": ("input_ids:int64[batch,seq]{0:100}", ["logits"], "other"),
    "vit": ("pixel_values:float32[batch,3,32,32]", ["logits"], "classify"),
    "resnet": ("pixel_values:float32[batch,3,224,224]", ["logits"], "classify"),
    "wav2vec2": ("input_values:float32[batch,samples]", ["last_hidden_state", "extract_features"], "other"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_task_loads_from_its_directory(dirs, name, caplog):
    first, outputs, task = EXPECTED[name]
    with caplog.at_level("INFO", logger="torchship"):
        m = load_source(str(dirs[name]), dims={"samples": 4000})
    assert str(m.spec.inputs[0]) == first and m.spec.output_names == outputs and m.task == task
    assert any(type(m.module.module).__name__ in r.message for r in caplog.records)  # one line: what was loaded
    assert m.arch.kind == "hf" and m.arch.imports is None  # the library's own class, no code from the directory


def test_an_output_length_that_follows_an_input_stays_symbolic(dirs):
    m = load_source(str(dirs["wav2vec2"]), dims={"samples": 4000})
    frames = {t.shape[1] for t in m.spec.outputs}
    assert len(frames) == 1 and isinstance(frames.pop(), str)  # both outputs share one symbol, not 399
    assert m.dims == {"samples": 4000}


def test_an_encoder_decoder_says_what_to_do(dirs):
    with pytest.raises(SourceError, match="encoder-decoder.*T5EncoderModel.*package.module:attr"):
        load_source(str(dirs["t5"]))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_task_optimizes_and_its_bundle_answers_like_the_model(dirs, name, tmp_path):
    runtimes = ("eager", "aoti", "onnxrt") if name == "bert" else ("onnxrt",)  # bert: a bounded sequence through export
    res = optimize(str(dirs[name]), OptimizeOptions(runtimes=runtimes, transforms=(), batch_sizes=(2,), seconds_per_size=0.05,
                                                    exhaustive=True), dims={"samples": 4000}, out=tmp_path / "b")
    assert all(v.status == "ok" for v in res.variants if v.selectable), [(v.name, v.reason) for v in res.variants]
    model = load_source(str(dirs[name]), dims={"samples": 4000})
    feeds = model.spec.sample(3, {s: max(2, n // 2) for s, n in model.dims.items()}, seed=5)  # other sizes than timed
    with torch.inference_mode():
        want = dict(zip(model.spec.output_names, (t.numpy() for t in model.module(*(torch.from_numpy(feeds[n])
                                                                                       for n in model.spec.input_names)))))
    got = load_bundle(res.bundle, trust_code=True)(feeds)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-3, atol=1e-4)
    if name == "bert":
        assert res.variant("aoti").artifact.options.dim_ranges["seq"][1] == 64  # torch's range for 64 positions


@pytest.mark.slow
def test_a_one_pass_head_of_an_encoder_decoder_config_optimizes(tmp_path):
    """WhisperForAudioClassification: its config says encoder-decoder, its forward is one encoder pass and a head."""
    cfg = tf.WhisperConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                           max_source_positions=16, max_target_positions=16, num_labels=3, vocab_size=100,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0, decoder_start_token_id=1)
    torch.manual_seed(0)
    model = tf.WhisperForAudioClassification(cfg).eval()
    model.save_pretrained(tmp_path / "whisper")
    m = load_source(str(tmp_path / "whisper"))
    assert str(m.spec.inputs[0]) == "input_features:float32[batch,8,32]" and m.task == "classify"
    res = optimize(str(tmp_path / "whisper"), OptimizeOptions(runtimes=("eager", "onnxrt"), transforms=(),
                                                              batch_sizes=(1, 2), seconds_per_size=0.02),
                   out=tmp_path / "b")
    x = np.random.default_rng(0).standard_normal((2, 8, 32)).astype(np.float32)
    with torch.inference_mode():
        want = model(input_features=torch.from_numpy(x)).logits.numpy()
    np.testing.assert_allclose(load_bundle(res.bundle)({"input_features": x})["logits"], want, rtol=1e-4, atol=1e-5)
