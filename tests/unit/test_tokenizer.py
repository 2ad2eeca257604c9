import random
import shutil

import pytest

from tests.helpers.data import TINY_VOCAB
from pipeline import cli
from pipeline.data.tokenizer import Tokenizer, padded_vocab_size, reservoir_sample

HARD_TEXTS = [
    "Hello  world", " leading space", "  two leading", "\tTab\there\n", "trailing   ", "▁literal metaspace",
    "Ünïcödé café naïve Straße", "日本語のテキスト 中文 한국어", "Привет, мир! Ελληνικά", "مرحبا بالعالم",
    "e\u0301 combining accent", "ﬁ ligature Ａfull width １２３", "12345 3.14159 1e-10 0x1F -42",
    "!!!???...,,,;;:: (a) [b] {c} <d> \"q\" 'q'", "a\u00a0b nbsp\u00a0\u00a0two", "x\u3000\u3000ideographic",
    "emoji 😀🎉 ok", "\x0bvt\x0cff", "a\x1cb\x1fc", "[MASK] and [CLS] in text [SEP][PAD][UNK]x", "", "   ", "\n",
    "a  \n  b", "word\u2028line", "zero\u200bwidth", "x\r\ny", "def f(x):\n    return x ** 2  # comment",
]


@pytest.fixture(scope="module")
def hf_tokenizer(spm_path, tmp_path_factory):
    from transformers import DebertaV2Tokenizer

    directory = tmp_path_factory.mktemp("hf")
    shutil.copy(spm_path, directory / "spm.model")
    return DebertaV2Tokenizer.from_pretrained(str(directory))


def test_special_ids_and_vocab_sizes(tok, hf_tokenizer):
    assert [tok.pad_id, tok.cls_id, tok.sep_id, tok.unk_id] == [0, 1, 2, 3]
    assert tok.mask_id == TINY_VOCAB and tok.vocab_size == TINY_VOCAB + 1 == len(hf_tokenizer)
    ids = [hf_tokenizer.pad_token_id, hf_tokenizer.cls_token_id, hf_tokenizer.sep_token_id,
           hf_tokenizer.unk_token_id, hf_tokenizer.mask_token_id]
    assert ids == [0, 1, 2, 3, tok.mask_id]
    assert padded_vocab_size(128000) == 128100 and padded_vocab_size(TINY_VOCAB) == 700
    assert tok.is_word_start.shape == (tok.vocab_size,) and tok.is_word_start[tok.sp.piece_to_id("▁")]


def test_single_texts_match_transformers(tok, hf_tokenizer, data_env):
    corpus_lines = open(data_env["corpus_files"][1], encoding="utf-8").read().splitlines()[:300]
    for text in HARD_TEXTS + corpus_lines:
        assert tok.encode(text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"], repr(text)
        assert tok.build_inputs(tok.encode(text)) == hf_tokenizer(text)["input_ids"], repr(text)


def test_whitespace_runs_match_transformers(tok, hf_tokenizer):
    """normalize() skips the whitespace substitution where it finds nothing to substitute: random runs of
    every kind of whitespace, mixed with letters, are tokenized as transformers does."""
    rng = random.Random(0)
    alphabet = "ab \t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u2003\u2028\u3000"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(3000)]
    for text in texts:
        assert tok.encode(text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"], repr(text)


def test_pairs_match_transformers(tok, hf_tokenizer):
    for first, second in zip(HARD_TEXTS, reversed(HARD_TEXTS)):
        if second == "":  # transformers then encodes a single text (`if text_pair:`), a documented difference
            continue
        expected = hf_tokenizer(first, second)["input_ids"]
        assert tok.build_inputs(tok.encode(first), tok.encode(second)) == expected, (first, second)


def test_split_special_tokens_treats_them_as_text(spm_path, tok):
    plain = Tokenizer(spm_path, split_special_tokens=True)
    assert tok.encode("a [MASK] b").count(tok.mask_id) == 1
    assert tok.mask_id not in plain.encode("a [MASK] b") and len(plain.encode("a [MASK] b")) > 3


def test_truncate_pair_keeps_budget(tok):
    a, b = tok.truncate_pair(list(range(10)), list(range(4)), 12)
    assert len(a) + len(b) + 3 == 12 and b == [0, 1, 2, 3]


def test_reservoir_sample_is_bounded_and_uniform():
    sample = reservoir_sample(iter(range(100_000)), 1000, seed=3)
    assert len(sample) == 1000 and len(set(sample)) == 1000
    assert 40_000 < sum(sample) / len(sample) < 60_000  # uniform over the whole stream, not its head


def test_not_a_deberta_model_is_rejected(tmp_path, data_env):
    import sentencepiece as spm

    lines = open(data_env["corpus_files"][0], encoding="utf-8").read().splitlines()[:500]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "plain"),
                                   vocab_size=300, minloglevel=2)
    with pytest.raises(ValueError, match="not a DeBERTa-v2 sentencepiece model"):
        Tokenizer(tmp_path / "plain.model")


def test_cli_train_and_encode(tmp_path, capsys, data_env):
    code = cli.main(["tokenizer", "train", "--input", data_env["corpus_files"][0], "--output",
                     str(tmp_path / "m" / "spm"), "--vocab-size", "300", "--sample-size", "2000"])
    assert code == 0 and "[MASK]=300" in capsys.readouterr().out
    assert cli.main(["tokenizer", "encode", "--model", str(tmp_path / "m" / "spm.model"), "hi", "there"]) == 0
    ids = capsys.readouterr().out.splitlines()[0].split()
    assert ids[0] == "1" and ids[-1] == "2" and ids.count("2") == 2


def test_cli_train_on_empty_file_fails_naming_it(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert cli.main(["tokenizer", "train", "--input", str(empty), "--output", str(tmp_path / "x")]) == 1
    assert f"{empty}: empty file" in capsys.readouterr().err


def test_cli_train_writes_both_files_or_none(tmp_path, capsys, data_env):
    """A failed training (too many pieces for the text) leaves neither file nor a temporary one; an
    unwritable --output is named in one line."""
    text = tmp_path / "small.txt"
    text.write_text("a few words of text\n")
    out = tmp_path / "m"
    assert cli.main(["tokenizer", "train", "--input", str(text), "--output", str(out / "spm"),
                     "--vocab-size", "5000"]) == 1
    assert "sentencepiece cannot train a 5000-piece model" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == []
    assert cli.main(["tokenizer", "train", "--input", data_env["corpus_files"][0], "--output",
                     str(out / "spm"), "--vocab-size", "300", "--sample-size", "2000"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["spm.model", "spm.vocab"]
    capsys.readouterr()
    assert cli.main(["tokenizer", "train", "--input", str(text), "--output", "/proc/deberta-ds-test/spm"]) == 1
    assert "error: /proc/deberta-ds-test/spm.model: cannot write the tokenizer" in capsys.readouterr().err
