"""GroupViT text pipeline: CLIP BPE tokenisation, caption -> label extraction (nouns / noun
phrases via NLTK), CLIP ImageNet prompt templates, and `CaptionLabeler`, the per-sample text
transform of the caption dataset.

Training pairs an image with its caption and with K labels taken from the caption (reference:
K=3 nouns; the thesis's best: 5 labels from noun phrases + nouns), each wrapped in a random
prompt template. With fewer than K labels the reference repeats the caption; the thesis's
refined extraction pads with `PAD_LABEL` instead, masked out of the losses (`label_mask`).

Offline by design: the BPE vocabulary is the file shipped inside `open_clip` and the prompt
templates come from `open_clip`'s metadata module, both read without importing `open_clip`
itself (several seconds of import). The NLTK tagger model is the one thing to install once:

    python -m nltk.downloader averaged_perceptron_tagger_eng

Tests (and anyone else) can inject any tagger: a callable `list[str] -> list[(word, tag)]`
producing Penn Treebank tags.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import random
import runpy
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

CONTEXT_LENGTH = 77
SOT_TOKEN = 49406
EOT_TOKEN = 49407
# `transformers`' names of the two special tokens (vocab.json); our tables call them
# <start_of_text> / <end_of_text> (open_clip's names), the ids are the same
HF_SOT, HF_EOT = "<|startoftext|>", "<|endoftext|>"
PAD_LABEL = "<PAD>"
EVAL_TEMPLATE = "a photo of a {}."

Tagger = Callable[[list[str]], list[tuple[str, str]]]

NOUN_TAGS: tuple[str, ...] = ("NN", "NNS", "NNP")
# The reference implementation also keeps verbs; pass as `keep_tags` to reproduce it.
REFERENCE_WORD_TAGS: tuple[str, ...] = (*NOUN_TAGS, "VBG", "VB", "VBD", "VBN", "VBP", "VBZ")
# Zero or more adjectives (JJ, JJR, JJS) followed by one or more nouns (NN, NNS, NNP, NNPS).
NOUN_PHRASE_GRAMMAR = "NP: {<JJ.*>*<NN.*>+}"

KINDS: tuple[str, ...] = ("nouns", "noun_phrases", "noun_phrases+nouns", "caption")
PAD_MODES: tuple[str, ...] = ("caption", "pad")

NLTK_SETUP_COMMAND = "python -m nltk.downloader averaged_perceptron_tagger_eng"


# --- open_clip package files -----------------------------------------------------------------


@lru_cache(maxsize=1)
def _open_clip_dir() -> Path:
    """Directory of the installed `open_clip` package, located without importing it."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip_torch is required for the CLIP vocabulary and templates")
    return Path(next(iter(spec.submodule_search_locations)))


def _openai_imagenet_templates() -> tuple[str, ...]:
    """CLIP's 80 ImageNet prompt templates as "{}" format strings. `zero_shot_metadata.py` is a
    plain data module (no imports), so it is run on its own instead of importing the package."""
    namespace = runpy.run_path(str(_open_clip_dir() / "zero_shot_metadata.py"))
    return tuple(make("{}") for make in namespace["OPENAI_IMAGENET_TEMPLATES"])


IMAGENET_TEMPLATES: tuple[str, ...] = _openai_imagenet_templates()


# --- CLIP BPE tokeniser ----------------------------------------------------------------------


@lru_cache(maxsize=1)
def _byte_symbols() -> dict[int, str]:
    """One printable character per byte value, in CLIP's vocabulary order: bytes that are
    visible Latin-1 characters stand for themselves (in byte order), then the other bytes
    (control characters, space, ...) are mapped, in byte order, to U+0100, U+0101, ..."""
    visible = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    hidden = [b for b in range(256) if b not in set(visible)]
    symbols = {b: chr(b) for b in visible}
    symbols.update({b: chr(256 + i) for i, b in enumerate(hidden)})
    return symbols


def clean_text(text: str) -> str:
    """CLIP's text normalisation: fix mojibake (ftfy), unescape HTML (twice), collapse
    whitespace, lower-case."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class _BpeVocabulary:
    """The CLIP byte-pair-encoding tables read from a `bpe_simple_vocab_16e6.txt.gz` file."""

    N_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes x 2 + merges + 2 specials

    def __init__(self, path: Path):
        import regex

        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 1 + self.N_MERGES]]
        self.merges: list[tuple[str, ...]] = merges
        symbols = list(_byte_symbols().values())
        vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges)]
        vocab += ["<start_of_text>", "<end_of_text>"]
        self.ids: dict[str, int] = {token: i for i, token in enumerate(vocab)}
        self.ranks: dict[tuple[str, str], int] = {m: r for r, m in enumerate(merges)}
        self.byte_to_symbol = _byte_symbols()
        self.sot = len(vocab) - 2
        self.eot = len(vocab) - 1
        # Contractions, letter runs, single digits, runs of other non-space characters.
        self.pattern = regex.compile(
            r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+", regex.IGNORECASE
        )
        self._cache: dict[str, list[int]] = {}

    def merge(self, piece: str) -> list[str]:
        """Greedy BPE: repeatedly merge every occurrence of the best-ranked adjacent pair."""
        parts = [*piece[:-1], piece[-1] + "</w>"]
        while len(parts) > 1:
            pairs = set(zip(parts[:-1], parts[1:]))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, len(self.ranks)))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode_piece(self, piece: str) -> list[int]:
        if piece not in self._cache:
            symbols = "".join(self.byte_to_symbol[b] for b in piece.encode("utf-8"))
            if len(self._cache) > 200_000:  # bound the memory of a long-running worker
                self._cache.clear()
            self._cache[piece] = [self.ids[p] for p in self.merge(symbols)]
        return self._cache[piece]

    def encode(self, text: str) -> list[int]:
        pieces = self.pattern.findall(clean_text(text))
        return [i for piece in pieces for i in self.encode_piece(piece)]


@lru_cache(maxsize=4)
def _load_vocabulary(path: str) -> _BpeVocabulary:
    return _BpeVocabulary(Path(path))


class ClipTokenizer:
    """CLIP's BPE tokeniser (lower-cased, 49408 tokens), offline: the vocabulary is the file
    that ships inside `open_clip`. The tables are loaded on first use and shared per process;
    the object itself only holds the path, so it pickles small (DataLoader workers)."""

    def __init__(self, bpe_path: str | Path | None = None):
        self.bpe_path = str(bpe_path) if bpe_path is not None else None

    @property
    def _vocab(self) -> _BpeVocabulary:
        path = self.bpe_path or str(_open_clip_dir() / "bpe_simple_vocab_16e6.txt.gz")
        return _load_vocabulary(path)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab.ids)

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, without start/end tokens."""
        return self._vocab.encode(text)

    def save_vocabulary(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write CLIP's `transformers` tokenizer files into `out_dir`, from the same BPE file:
        `vocab.json` (token -> id; the specials named <|startoftext|> / <|endoftext|>) and
        `merges.txt` ('#version: 0.2' header, then one merge per line, by rank). A
        `transformers.CLIPTokenizer` built from them gives our ids (its text clean-up lacks
        ftfy and HTML unescaping, which only matter for broken or escaped text)."""
        vocab = self._vocab
        names = {vocab.sot: HF_SOT, vocab.eot: HF_EOT}
        ids = {names.get(i, token): i for token, i in vocab.ids.items()}
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        vocab_path, merges_path = out / "vocab.json", out / "merges.txt"
        merges = "".join(" ".join(pair) + "\n" for pair in vocab.merges)
        for path, text in (
            (vocab_path, json.dumps(ids, ensure_ascii=False)),
            (merges_path, "#version: 0.2\n" + merges),
        ):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
        return vocab_path, merges_path

    def __call__(self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> Tensor:
        """LongTensor [N, context_length]: [SOT] + ids + [EOT], zero padded. Too long texts are
        cut, keeping EOT as the last token (as CLIP does)."""
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (SOT + EOT), got {context_length}")
        if isinstance(texts, str):
            texts = [texts]
        vocab = self._vocab
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [vocab.sot, *vocab.encode(text)][: context_length - 1] + [vocab.eot]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


# --- part-of-speech tagging ------------------------------------------------------------------


class NltkPosTagger:
    """NLTK's English averaged-perceptron tagger (what `nltk.pos_tag` uses), loaded once on
    first call instead of on every call as `nltk.pos_tag` does. Pickles without the model."""

    def __init__(self) -> None:
        self._model: Any = None

    def _load(self) -> Any:
        from nltk.tag.perceptron import PerceptronTagger

        try:
            return PerceptronTagger()
        except LookupError as err:
            raise LookupError(
                "the NLTK part-of-speech tagger model is not installed; run once:\n"
                f"    {NLTK_SETUP_COMMAND}"
            ) from err

    def __call__(self, words: list[str]) -> list[tuple[str, str]]:
        if isinstance(words, str):
            raise TypeError("the tagger takes a list of words, not a string")
        if self._model is None:
            self._model = self._load()
        return self._model.tag(list(words))

    def __getstate__(self) -> dict[str, Any]:
        return {"_model": None}


def nltk_pos_tagger() -> Tagger:
    """The default tagger: NLTK's `pos_tag` model (Penn Treebank tags), loaded lazily.

    Setup step (once per machine; there is no download at run time):
        python -m nltk.downloader averaged_perceptron_tagger_eng
    Without it the first call raises a LookupError naming that command."""
    return NltkPosTagger()


@lru_cache(maxsize=1)
def _default_tagger() -> Tagger:
    return nltk_pos_tagger()


def tokenize_caption(caption: str) -> list[str]:
    """Lower-cased word tokens: `nltk.word_tokenize(..., preserve_line=True)` (no punkt model
    needed). Without sentence splitting, a period inside a multi-sentence caption stays glued
    to its word ("dogs."), so it is split off here."""
    from nltk import word_tokenize

    words: list[str] = []
    for word in word_tokenize(caption.lower(), preserve_line=True):
        stem = word[:-1]
        if len(word) > 1 and word.endswith(".") and "." not in stem and stem.isalnum():
            words += [stem, "."]
        else:
            words.append(word)
    return words


def _is_word(token: str) -> bool:
    return any(ch.isalnum() for ch in token)


def tag_caption(caption: str, tagger: Tagger | None = None) -> list[tuple[str, str]]:
    """(word, Penn Treebank tag) pairs of the lower-cased caption. Tokens without a letter or
    digit are tagged "SYM" whatever the tagger says, so they never count as nouns."""
    tagger = tagger if tagger is not None else _default_tagger()
    words = tokenize_caption(caption)
    if not words:
        return []
    return [(w, tag if _is_word(w) else "SYM") for w, tag in tagger(words)]


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def extract_nouns(
    caption: str, tagger: Tagger | None = None, keep_tags: Sequence[str] = NOUN_TAGS
) -> list[str]:
    """Words of the caption whose tag is in `keep_tags` (exact match), unique, in order of
    appearance. `REFERENCE_WORD_TAGS` adds the verbs the reference code also keeps."""
    keep = set(keep_tags)
    return _unique([w for w, tag in tag_caption(caption, tagger) if tag in keep])


@lru_cache(maxsize=8)
def _chunker(grammar: str) -> Any:
    from nltk import RegexpParser

    return RegexpParser(grammar)


def extract_noun_phrases(
    caption: str, tagger: Tagger | None = None, grammar: str = NOUN_PHRASE_GRAMMAR
) -> list[str]:
    """Chunks labelled NP by an NLTK regexp chunker (default: adjectives + nouns, so a bare
    noun is a phrase too), words joined by spaces, unique, in order of appearance."""
    tagged = tag_caption(caption, tagger)
    if not tagged:
        return []
    tree = _chunker(grammar).parse(tagged)
    phrases = [
        " ".join(word for word, _ in chunk.leaves())
        for chunk in tree.subtrees(lambda t: t.label() == "NP")
    ]
    return _unique(phrases)


# --- label selection -------------------------------------------------------------------------


def candidate_labels(
    caption: str, kind: str, tagger: Tagger | None = None, noun_tags: Sequence[str] = NOUN_TAGS
) -> list[str]:
    """All label candidates of a caption, in order, unique.

    kind: "nouns"; "noun_phrases"; "noun_phrases+nouns" = the noun phrases, then the nouns not
    already among them (so "black dog" contributes "dog" as a second, coarser label, while a
    bare-noun phrase "tree" is not doubled); "caption" = the caption itself."""
    _check_choice("kind", kind, KINDS)
    if kind == "caption":
        return [caption]
    if kind == "nouns":
        return extract_nouns(caption, tagger, noun_tags)
    phrases = extract_noun_phrases(caption, tagger)
    if kind == "noun_phrases":
        return phrases
    return _unique([*phrases, *extract_nouns(caption, tagger, noun_tags)])


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _select(
    caption: str,
    k: int,
    kind: str,
    pad: str,
    tagger: Tagger | None,
    rng: random.Random,
    noun_tags: Sequence[str],
) -> tuple[list[str], list[bool], int]:
    """(labels, mask, n) where the first n labels are extracted from the caption and the rest
    are padding."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    _check_choice("pad", pad, PAD_MODES)
    candidates = candidate_labels(caption, kind, tagger, noun_tags)
    if len(candidates) > k:
        keep = sorted(rng.sample(range(len(candidates)), k))
        candidates = [candidates[i] for i in keep]
    n = len(candidates)
    filler, valid = (caption, True) if pad == "caption" else (PAD_LABEL, False)
    return candidates + [filler] * (k - n), [True] * n + [valid] * (k - n), n


def select_labels(
    caption: str,
    k: int,
    kind: str = "nouns",
    pad: str = "caption",
    tagger: Tagger | None = None,
    rng: random.Random | None = None,
    noun_tags: Sequence[str] = NOUN_TAGS,
) -> tuple[list[str], list[bool]]:
    """Exactly k labels for a caption and their validity mask.

    More than k candidates (see `candidate_labels`): a uniform random subset of k, in caption
    order. Fewer: pad="caption" fills with the whole caption, valid (the reference);
    pad="pad" fills with PAD_LABEL, invalid (the thesis's refined extraction, masked out of the
    losses). kind="caption" has one candidate, the caption: k copies with pad="caption",
    [caption, PAD_LABEL, ...] with pad="pad". Defaults: the reference (k=3 nouns, caption
    padding); the thesis's best is k=5, kind="noun_phrases+nouns", pad="pad".
    `tagger` None: NLTK's; `rng` None: a stream drawn from the global `random` state."""
    rng = rng if rng is not None else random.Random(random.getrandbits(64))
    labels, mask, _ = _select(caption, k, kind, pad, tagger, rng, noun_tags)
    return labels, mask


def apply_template(
    label: str, rng: random.Random, templates: Sequence[str] = IMAGENET_TEMPLATES
) -> str:
    """`label` in a random prompt template ("{}" format string); PAD_LABEL stays PAD_LABEL."""
    if label == PAD_LABEL:
        return label
    if not templates:
        raise ValueError("templates must not be empty")
    return rng.choice(templates).format(label)


# --- dataset text transform ------------------------------------------------------------------


class CaptionLabeler:
    """Per-sample text transform: caption -> caption tokens and K (templated) label tokens.

    Picklable (it runs inside DataLoader workers): the default NLTK tagger and the BPE tables
    are loaded lazily in each process, so construction works offline and without the tagger
    model installed. An injected `tagger` must itself be picklable to use worker processes.

    Prompt templates wrap extracted labels only: caption padding and kind="caption" labels are
    used verbatim (as in the reference), and PAD labels are tokenised as the empty text
    ([SOT, EOT]) - a well-formed sequence whose embedding the losses mask out.
    """

    def __init__(
        self,
        k: int = 3,
        kind: str = "nouns",
        pad: str = "caption",
        tagger: Tagger | None = None,
        templates: Sequence[str] = IMAGENET_TEMPLATES,
        context_length: int = CONTEXT_LENGTH,
        use_templates: bool = True,
        noun_tags: Sequence[str] = NOUN_TAGS,
    ):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        _check_choice("kind", kind, KINDS)
        _check_choice("pad", pad, PAD_MODES)
        if use_templates and not templates:
            raise ValueError("templates must not be empty when use_templates is True")
        self.k = k
        self.kind = kind
        self.pad = pad
        self.tagger = tagger if tagger is not None else nltk_pos_tagger()
        self.templates = tuple(templates)  # Hydra hands lists over as ListConfig
        self.context_length = int(context_length)
        self.use_templates = bool(use_templates)
        self.noun_tags = tuple(noun_tags)
        self.tokenizer = ClipTokenizer()

    def prompts(self, labels: Sequence[str], n_extracted: int, rng: random.Random) -> list[str]:
        """The texts fed to the text encoder: templated extracted labels, verbatim padding."""
        templated = self.use_templates and self.kind != "caption"
        return [
            apply_template(label, rng, self.templates) if templated and i < n_extracted else label
            for i, label in enumerate(labels)
        ]

    def __call__(self, caption: str, rng: random.Random) -> dict[str, Any]:
        """{"caption_tokens": LongTensor[L], "label_tokens": LongTensor[K, L],
        "label_mask": BoolTensor[K], "labels": list[str] (raw labels, before templating)}."""
        labels, mask, n = _select(
            caption, self.k, self.kind, self.pad, self.tagger, rng, self.noun_tags
        )
        texts = [text if valid else "" for valid, text in zip(mask, self.prompts(labels, n, rng))]
        return {
            "caption_tokens": self.tokenizer(caption, self.context_length)[0],
            "label_tokens": self.tokenizer(texts, self.context_length),
            "label_mask": torch.tensor(mask, dtype=torch.bool),
            "labels": labels,
        }
