"""The sentencepiece tokenizer with DeBERTa-v2's special ids, and `deberta-ds tokenizer train|encode`.

Ids: [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3 are pieces of the sentencepiece model; [MASK] is appended after
the sentencepiece vocabulary (id = spm size, 128000 for a 128k model). The model's embedding table is
larger: `padded_vocab_size` rounds up to a multiple of 100 (128001 -> 128100, as the released 1.5B).

Encoding equals transformers 5's `DebertaV2Tokenizer` built from the same spm.model. That class does not
run sentencepiece: it rebuilds a `tokenizers` Unigram from the piece scores and replaces the model's own
normalizer by: collapse `\\s{2,}|[\\n\\r\\t]` to " ", NFC, strip on the right; then Metaspace ("▁" for
" ", prepend "▁" unless the text already starts with one). We apply that normalization in Python and
run sentencepiece with its normalizer switched off (identity rule, no whitespace removal), which gives
the same pieces at sentencepiece's speed. Literal special-token strings ("[MASK]", "[CLS]", ...) in the
text are matched as special tokens, as transformers does, unless `split_special_tokens=True`.
"""
import hashlib
import os
import random
import re
import unicodedata

import numpy as np

from pipeline.errors import DataError, OutputError
from pipeline.cli_types import at_least, coverage, positive_int

DEFAULT_VOCAB_SIZE = 128000
PAD, CLS, SEP, UNK, MASK = "[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"
VOCAB_MULTIPLE = 100

_SPECIAL_STRINGS = re.compile("(" + "|".join(re.escape(t) for t in (PAD, CLS, SEP, UNK, MASK)) + ")")
# Unicode White_Space: Rust's char::is_whitespace, and \s in tokenizers' regex engine (Oniguruma).
# Python's \s also matches \x1c-\x1f, so the patterns below spell the class out.
_RUST_WHITESPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
                    + "\u2028\u2029\u202f\u205f\u3000")
_SPACE = "[" + re.escape(_RUST_WHITESPACE) + "]"
# transformers 5 DebertaV2Tokenizer's normalizer: \s{2,}|[\n\r\t] -> " "
_WHITESPACE = re.compile(_SPACE + "{2,}|[\n\r\t]")
_WHITESPACE_PAIR = re.compile(_SPACE * 2)  # finds what {2,} would, in under half the time


def padded_vocab_size(spm_size, multiple=VOCAB_MULTIPLE):
    """Embedding rows for a model: spm pieces + [MASK], rounded up to `multiple` (128000 -> 128100)."""
    return -(-(spm_size + 1) // multiple) * multiple


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def normalize(text):
    """transformers 5 DebertaV2Tokenizer normalization (do_lower_case=False)."""
    # Most lines need no substitution, and looking is cheaper than substituting: the sub's \s{2,} costs
    # more than a third of raw sentencepiece's time per line, these checks about a seventh.
    if "\n" in text or "\r" in text or "\t" in text or _WHITESPACE_PAIR.search(text):
        text = _WHITESPACE.sub(" ", text)
    text = unicodedata.normalize("NFC", text)
    return text.rstrip(_RUST_WHITESPACE)


def _processor_without_normalizer(model_bytes, path):
    """A SentencePieceProcessor for the model with its own normalization switched off."""
    import sentencepiece as spm
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_bytes)
    except DecodeError as err:
        raise DataError(f"{path}: not a sentencepiece model ({err})") from None
    spec = proto.normalizer_spec
    spec.name = "identity"
    spec.precompiled_charsmap = b""
    spec.remove_extra_whitespaces = False
    spec.add_dummy_prefix = True
    spec.escape_whitespaces = True
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString()), proto


class Tokenizer:
    """DeBERTa-v2 tokenizer on a sentencepiece model; ids equal transformers' DebertaV2Tokenizer."""

    pad_id, cls_id, sep_id, unk_id = 0, 1, 2, 3

    def __init__(self, spm_path, split_special_tokens=False):
        with open(spm_path, "rb") as handle:
            model_bytes = handle.read()
        self.spm_path = str(spm_path)
        self.fingerprint = hashlib.sha256(model_bytes).hexdigest()
        self.split_special_tokens = split_special_tokens
        self.sp, proto = _processor_without_normalizer(model_bytes, spm_path)
        self._check_special_pieces(spm_path)
        self.spm_size = self.sp.get_piece_size()
        self.mask_id = self.spm_size
        self.vocab_size = self.spm_size + 1
        self.padded_vocab_size = padded_vocab_size(self.spm_size)
        pieces = [p.piece for p in proto.pieces]
        # Control pieces never start a word; [MASK] is not a word continuation either.
        self.is_word_start = np.array([p.startswith("▁") for p in pieces] + [True], dtype=bool)
        self.is_special = np.zeros(self.vocab_size, dtype=bool)
        self.is_special[[self.pad_id, self.cls_id, self.sep_id, self.unk_id, self.mask_id]] = True
        self._special_ids = {PAD: 0, CLS: 1, SEP: 2, UNK: 3, MASK: self.mask_id}

    def _check_special_pieces(self, spm_path):
        expected = (PAD, CLS, SEP, UNK)
        found = tuple(self.sp.id_to_piece(i) for i in range(4))
        if found != expected:
            raise DataError(f"{spm_path}: not a DeBERTa-v2 sentencepiece model: ids 0-3 are {found}, "
                             f"expected {expected} (train one with `deberta-ds tokenizer train`)")

    def __len__(self):
        return self.vocab_size

    def check_fits(self, model_vocab_size, what, fix):
        """Refuse a model whose embedding table has fewer rows than this tokenizer has ids (both trainers)."""
        if model_vocab_size < self.vocab_size:
            from pipeline.errors import ConfigError
            raise ConfigError(f"{what} {model_vocab_size} is smaller than the tokenizer's {self.vocab_size} ids "
                              f"({self.spm_path}: spm pieces + [MASK]); {fix}")

    def encode(self, text):
        """Token ids of one text, without [CLS]/[SEP]."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts):
        """Token ids of each text (sentencepiece encodes the batch in one call)."""
        if self.split_special_tokens:
            return self._encode_plain([normalize(t) for t in texts])
        return [self._encode_with_specials(t) if "[" in t else self._encode_plain([normalize(t)])[0]
                for t in texts]

    def _encode_plain(self, normalized_texts):
        # Metaspace prepends "▁" only when the text does not start with one (a leading " " becomes "▁");
        # sentencepiece always adds its dummy prefix, so give it the text without that first character.
        trimmed = [t[1:] if t[:1] in (" ", "▁") else t for t in normalized_texts]
        return self.sp.encode(trimmed)

    def _encode_with_specials(self, text):
        # transformers splits the raw text on special-token strings first, then normalizes each part.
        ids = []
        for part in _SPECIAL_STRINGS.split(text):
            if part in self._special_ids:
                ids.append(self._special_ids[part])
            elif part:
                ids.extend(self._encode_plain([normalize(part)])[0])
        return ids

    def build_inputs(self, ids_a, ids_b=None):
        """[CLS] a [SEP] or [CLS] a [SEP] b [SEP]."""
        out = [self.cls_id] + list(ids_a) + [self.sep_id]
        if ids_b is not None:
            out += list(ids_b) + [self.sep_id]
        return out

    def truncate_pair(self, ids_a, ids_b, max_len):
        """Drop tokens from the end of the longer sequence until [CLS] a [SEP] b [SEP] fits max_len."""
        ids_a, ids_b = list(ids_a), list(ids_b or [])
        budget = max_len - (3 if ids_b else 2)
        while len(ids_a) + len(ids_b) > budget:
            (ids_a if len(ids_a) >= len(ids_b) else ids_b).pop()
        return ids_a, ids_b

    def decode(self, ids):
        specials = {v: k for k, v in self._special_ids.items()}
        pieces = [specials.get(i) or self.sp.id_to_piece(int(i)) for i in ids]
        return "".join(pieces).replace("▁", " ").strip()


# ---------------------------------------------------------------- training

def reservoir_sample(texts, size, seed):
    """A uniform sample of `size` texts from a stream of unknown length, in O(size) memory."""
    rng = random.Random(seed)
    sample = []
    for seen, text in enumerate(texts):
        if seen < size:
            sample.append(text)
        else:
            slot = rng.randrange(seen + 1)
            if slot < size:
                sample[slot] = text
    return sample


def train(texts, model_prefix, vocab_size=DEFAULT_VOCAB_SIZE, sample_size=1_000_000, seed=0,
          character_coverage=0.9995, num_threads=1, max_sentence_bytes=4192):
    """Train a unigram model with DeBERTa's special ids on a reservoir sample of `texts`; return the path."""
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    sentences = [normalize(t)[:max_sentence_bytes // 4] for t in reservoir_sample(texts, sample_size, seed)]
    sentences = [s for s in sentences if s]
    if not sentences:
        raise DataError("no text to train the tokenizer on")
    # sentencepiece writes PREFIX.model and PREFIX.vocab itself: under a temporary prefix beside them, renamed
    # once both are complete, so that a failed run leaves no half-written or mismatched pair
    folder, name = os.path.split(os.path.abspath(model_prefix))
    temporary = os.path.join(folder, f".{name}.tmp{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        open(f"{temporary}.model", "wb").close()  # an unwritable place fails here, named, not inside sentencepiece
    except OSError as error:
        raise OutputError(f"{model_prefix}.model: cannot write the tokenizer ({error.strerror or error})") from None
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_prefix=temporary, model_type="unigram",
            vocab_size=vocab_size, character_coverage=character_coverage, num_threads=num_threads,
            pad_id=0, pad_piece=PAD, bos_id=1, bos_piece=CLS, eos_id=2, eos_piece=SEP, unk_id=3, unk_piece=UNK,
            # We normalize before training and before encoding (as transformers does); the model must not.
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
            byte_fallback=False, input_sentence_size=0, shuffle_input_sentence=False,
            max_sentence_length=max_sentence_bytes, hard_vocab_limit=True, minloglevel=2,
        )
        os.replace(f"{temporary}.vocab", f"{model_prefix}.vocab")
        os.replace(f"{temporary}.model", f"{model_prefix}.model")
    except RuntimeError as error:  # e.g. "Vocabulary size too high": more pieces than the text has
        first = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise DataError(f"sentencepiece cannot train a {vocab_size}-piece model on these {len(sentences)} texts "
                        f"({first}); change --vocab-size as it says, or give more text") from None
    except OSError as error:
        raise OutputError(f"{model_prefix}: cannot write the tokenizer ({error.strerror or error})") from None
    finally:
        for suffix in (".model", ".vocab"):
            if os.path.exists(temporary + suffix):
                os.remove(temporary + suffix)
    return f"{model_prefix}.model"


# ---------------------------------------------------------------- CLI

def add_arguments(parser):
    from pipeline.data import sources

    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    trainer = sub.add_parser("train", help="train a unigram sentencepiece model with DeBERTa-v2 special ids")
    sources.add_source_arguments(trainer)
    trainer.add_argument("--output", required=True,
                         help="model prefix: writes PREFIX.model and PREFIX.vocab (e.g. out/spm)")
    trainer.add_argument("--vocab-size", type=at_least(8), default=DEFAULT_VOCAB_SIZE,
                         help="sentencepiece pieces, specials included; [MASK] gets this id "
                              "(default %(default)s)")
    trainer.add_argument("--sample-size", type=positive_int, default=1_000_000,
                         help="documents sampled (reservoir, uniform) from the stream to train on "
                              "(default %(default)s)")
    trainer.add_argument("--seed", type=int, default=0, help="sampling and training seed (default %(default)s)")
    trainer.add_argument("--character-coverage", type=coverage, default=0.9995,
                         help="share of characters the vocabulary must cover (default %(default)s)")
    trainer.add_argument("--threads", type=positive_int, default=1, help="sentencepiece trainer threads (default %(default)s)")
    encoder = sub.add_parser("encode", help="print the ids and pieces of a text (for inspection)")
    encoder.add_argument("--model", required=True, help="the spm.model file")
    encoder.add_argument("text", nargs="+", help="text to encode; two texts are encoded as a pair")


def run(args):
    if args.action == "train":
        return _run_train(args)
    return _run_encode(args)


def _run_train(args):

    texts = _source_texts(args)
    path = train(texts, args.output, vocab_size=args.vocab_size, sample_size=args.sample_size,
                 seed=args.seed, character_coverage=args.character_coverage, num_threads=args.threads)
    tok = Tokenizer(path)
    print(f"wrote {path}: {tok.spm_size} pieces, [MASK]={tok.mask_id}, "
          f"model vocab_size={tok.padded_vocab_size}, sha256={tok.fingerprint}")
    return 0


def _source_texts(args):
    from pipeline.data import sources

    if args.dataset:
        return sources.iter_dataset_texts(args.dataset, args.dataset_config, args.dataset_split, args.text_field)
    files = sources.expand_inputs(args.input)
    if not files:
        raise sources.InputError("give --input files or --dataset")
    return (t for f in files for t in sources.iter_file_texts(f, args.text_field, args.max_line_bytes))


def _run_encode(args):
    tok = Tokenizer(args.model)
    parts = [tok.encode(t) for t in args.text[:2]]
    ids = tok.build_inputs(*parts)
    print(" ".join(map(str, ids)))
    print(" ".join(tok.decode([i]) or tok.sp.id_to_piece(i) for i in ids))
    return 0
