"""Small text models saved here, with a real WordPiece tokenizer built from a vocabulary (no hub download): a plain
BERT directory and a sentence-transformers directory (Transformer, mean Pooling, Normalize) around it."""
from pathlib import Path

import pytest

WORDS = ("the a an is was and or of to in on for with it this that model server text answer fast slow good bad "
         "data cat dog runs ran quick brown fox jumps over lazy hello world embed sentence batch token river city "
         "night rain budget report engineer").split()


def tokenizer(folder: Path):
    """A BERT-style fast tokenizer (lower-casing, WordPiece, [CLS] ... [SEP]) saved into ``folder``."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] \
        + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-:;()")
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = decoders.WordPiece()
    fast = tf.BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                sep_token="[SEP]", mask_token="[MASK]", model_max_length=48)
    fast.save_pretrained(folder)
    return fast


def bert_dir(folder: Path, positions: int = 64) -> Path:
    import torch
    import transformers as tf
    fast = tokenizer(folder)
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=len(fast), max_position_embeddings=positions, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64)
    tf.BertModel(cfg).eval().save_pretrained(folder)
    return folder


def sentence_transformers_dir(folder: Path, normalize: bool = True, max_seq_length: int = 40) -> Path:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    bert = bert_dir(folder.parent / (folder.name + "-bert"))
    word = Transformer(str(bert), max_seq_length=max_seq_length)
    mods = [word, Pooling(word.get_embedding_dimension(), "mean")] + ([Normalize()] if normalize else [])
    SentenceTransformer(modules=mods, device="cpu").save(str(folder))
    return folder


@pytest.fixture(scope="session")
def st_dir(tmp_path_factory):
    return sentence_transformers_dir(tmp_path_factory.mktemp("text") / "st")


@pytest.fixture(scope="session")
def st_bundle(st_dir, tmp_path_factory):
    """A bundle of the sentence-transformers directory that takes text (eager and ONNX Runtime, no compression)."""
    from torchship import OptimizeOptions, optimize
    out = tmp_path_factory.mktemp("text") / "st-bundle"
    opts = OptimizeOptions(runtimes=("eager", "onnxrt"), transforms=(), batch_sizes=(1, 4), seconds_per_size=0.02)
    result = optimize(st_dir, opts, out=out, name="st")
    assert result.bundle is not None, result.message
    return out


def vit_dir(folder: Path, labels=("cat", "dog", "fox", "owl", "eel"), processor: str = "vit") -> Path:
    """A small ViT image classifier with its image processor and labels: ViT's (resize to 32x32, rescale, normalize)
    or CLIP's (shorter side to 32, center crop 32x32, bicubic, its own mean and std)."""
    import torch
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.ViTConfig(image_size=32, patch_size=8, num_labels=len(labels), hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, id2label=dict(enumerate(labels)),
                       label2id={n: i for i, n in enumerate(labels)})
    tf.ViTForImageClassification(cfg).eval().save_pretrained(folder)
    if processor == "clip":
        tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    else:
        tf.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                             image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def resnet_dir(folder: Path) -> Path:
    """A small ResNet classifier with ConvNeXt's image processor (shorter side to 224 / 0.875, then a 224 crop), as
    transformers' ResNet checkpoints have."""
    import torch
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3,
                          id2label={0: "red", 1: "green", 2: "blue"}, label2id={"red": 0, "green": 1, "blue": 2})
    tf.ResNetForImageClassification(cfg).eval().save_pretrained(folder)
    tf.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def vit_bundle(tmp_path_factory):
    """A bundle of the ViT classifier that takes images and answers with labels (eager and ONNX Runtime)."""
    from torchship import OptimizeOptions, optimize
    root = tmp_path_factory.mktemp("image")
    opts = OptimizeOptions(runtimes=("eager", "onnxrt"), transforms=(), batch_sizes=(1, 4), seconds_per_size=0.02)
    result = optimize(vit_dir(root / "vit"), opts, out=root / "vit-bundle", name="vit")
    assert result.bundle is not None, result.message
    return result.bundle
