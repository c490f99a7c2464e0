"""GroupViT text pipeline: CLIP tokeniser (open_clip as oracle), prompt templates, noun /
noun-phrase extraction through the real NLTK code path with a perceptron tagger trained here on
a hand-tagged sample (no model download), label selection and the dataset text transform."""

import itertools
import pickle
import random

import pytest
import torch
from nltk.tag import str2tuple
from nltk.tag.perceptron import PerceptronTagger

from vitlab.models.groupvit import text as T
from vitlab.models.groupvit.text import (
    CONTEXT_LENGTH,
    EOT_TOKEN,
    EVAL_TEMPLATE,
    IMAGENET_TEMPLATES,
    PAD_LABEL,
    REFERENCE_WORD_TAGS,
    SOT_TOKEN,
    CaptionLabeler,
    ClipTokenizer,
    NltkPosTagger,
    apply_template,
    candidate_labels,
    extract_noun_phrases,
    extract_nouns,
    nltk_pos_tagger,
    select_labels,
    tokenize_caption,
)

# Lower-cased COCO-like captions with Penn Treebank tags, to train a tiny tagger offline.
TAGGED_CAPTIONS = """
a/DT black/JJ dog/NN sits/VBZ on/IN the/DT green/JJ grass/NN ./.
a/DT white/JJ dog/NN runs/VBZ on/IN the/DT beach/NN ./.
a/DT small/JJ cat/NN sleeps/VBZ on/IN a/DT red/JJ sofa/NN ./.
the/DT cat/NN sleeps/VBZ on/IN the/DT bed/NN ./.
a/DT brown/JJ horse/NN runs/VBZ in/IN a/DT large/JJ field/NN ./.
two/CD dogs/NNS play/VBP in/IN the/DT grass/NN ./.
a/DT man/NN rides/VBZ a/DT bike/NN down/IN the/DT street/NN ./.
a/DT woman/NN is/VBZ holding/VBG a/DT tennis/NN racket/NN ./.
a/DT young/JJ boy/NN throws/VBZ a/DT red/JJ ball/NN ./.
a/DT girl/NN is/VBZ flying/VBG a/DT kite/NN in/IN the/DT blue/JJ sky/NN ./.
a/DT red/JJ bus/NN is/VBZ parked/VBN on/IN the/DT street/NN ./.
a/DT large/JJ pizza/NN sits/VBZ on/IN a/DT wooden/JJ table/NN ./.
a/DT plate/NN of/IN food/NN on/IN a/DT table/NN ./.
three/CD people/NNS are/VBP sitting/VBG on/IN a/DT bench/NN ./.
a/DT tall/JJ giraffe/NN stands/VBZ near/IN a/DT tree/NN ./.
a/DT man/NN is/VBZ riding/VBG a/DT wave/NN on/IN a/DT surfboard/NN ./.
the/DT old/JJ man/NN walks/VBZ his/PRP$ dog/NN in/IN the/DT park/NN ./.
a/DT train/NN is/VBZ on/IN the/DT tracks/NNS ./.
a/DT yellow/JJ train/NN runs/VBZ along/IN the/DT tracks/NNS ./.
a/DT black/JJ cat/NN sits/VBZ in/IN the/DT window/NN ./.
a/DT dog/NN is/VBZ eating/VBG food/NN from/IN a/DT bowl/NN ./.
a/DT white/JJ boat/NN in/IN the/DT blue/JJ water/NN ./.
two/CD cats/NNS sleep/VBP on/IN a/DT green/JJ sofa/NN ./.
a/DT woman/NN runs/VBZ on/IN the/DT beach/NN with/IN a/DT dog/NN ./.
the/DT kitchen/NN has/VBZ a/DT white/JJ table/NN ./.
a/DT young/JJ girl/NN holds/VBZ a/DT small/JJ cat/NN ./.
a/DT big/JJ dog/NN runs/VBZ through/IN the/DT field/NN ./.
a/DT man/NN and/CC a/DT woman/NN sit/VBP on/IN a/DT bench/NN ./.
a/DT group/NN of/IN people/NNS standing/VBG in/IN a/DT kitchen/NN ./.
a/DT brown/JJ bear/NN walks/VBZ in/IN the/DT green/JJ grass/NN ./.
the/DT sky/NN is/VBZ blue/JJ ./.
the/DT grass/NN is/VBZ green/JJ ./.
a/DT boy/NN plays/VBZ with/IN a/DT frisbee/NN in/IN the/DT park/NN ./.
an/DT elephant/NN stands/VBZ in/IN the/DT water/NN ./.
a/DT small/JJ bird/NN sits/VBZ on/IN a/DT branch/NN ./.
a/DT clock/NN on/IN a/DT tall/JJ building/NN ./.
a/DT pizza/NN with/IN cheese/NN on/IN a/DT plate/NN ./.
a/DT motorcycle/NN is/VBZ parked/VBN near/IN a/DT red/JJ car/NN ./.
a/DT skier/NN goes/VBZ down/IN a/DT snowy/JJ hill/NN ./.
a/DT black/JJ and/CC white/JJ cow/NN in/IN a/DT field/NN ./.
the/DT dog/NN runs/VBZ after/IN the/DT ball/NN ./.
a/DT cat/NN runs/VBZ on/IN the/DT grass/NN ./.
a/DT man/NN in/IN a/DT blue/JJ shirt/NN throws/VBZ a/DT frisbee/NN ./.
people/NNS walk/VBP down/IN a/DT busy/JJ street/NN ./.
a/DT sandwich/NN and/CC a/DT cup/NN of/IN coffee/NN ./.
a/DT little/JJ girl/NN sits/VBZ at/IN a/DT wooden/JJ table/NN ./.
a/DT brown/JJ dog/NN sleeps/VBZ under/IN the/DT table/NN ./.
a/DT large/JJ airplane/NN flies/VBZ in/IN the/DT sky/NN ./.
"""

A_PHOTO_OF_A_CAT = [SOT_TOKEN, 320, 1125, 539, 320, 2368, 269, EOT_TOKEN]


class DictTagger:
    """Deterministic tagger for exact-behaviour tests: a word -> tag table, default DT."""

    def __init__(self, tags: dict[str, str], default: str = "DT"):
        self.tags = tags
        self.default = default

    def __call__(self, words):
        return [(w, self.tags.get(w, self.default)) for w in words]


DICT_TAGGER = DictTagger(
    {
        **dict.fromkeys(["black", "green", "big", "red", "old"], "JJ"),
        **dict.fromkeys(["dog", "grass", "tree", "bus", "tennis", "racket", "man"], "NN"),
        "dogs": "NNS",
        "runs": "VBZ",
        "holds": "VBZ",
        "on": "IN",
        "near": "IN",
        "and": "CC",
    }
)
CAPTION = "a black dog on green grass near a tree"
# noun phrases, then the nouns not already among them
CANDIDATES = ["black dog", "green grass", "tree", "dog", "grass"]


@pytest.fixture(scope="module")
def open_clip():
    return pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def trained_tagger():
    sentences = [[str2tuple(t) for t in line.split()] for line in TAGGED_CAPTIONS.split("\n")]
    sentences = [s for s in sentences if s]
    state = random.getstate()  # PerceptronTagger.train shuffles with the global RNG
    random.seed(0)
    try:
        tagger = PerceptronTagger(load=False)
        tagger.train(sentences, nr_iter=10)
    finally:
        random.setstate(state)
    return tagger.tag


# --- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_known_ids_match_open_clip(open_clip):
    tokens = ClipTokenizer()("a photo of a cat.")
    assert tokens.dtype == torch.long and tokens.shape == (1, CONTEXT_LENGTH)
    assert tokens[0, :8].tolist() == A_PHOTO_OF_A_CAT
    assert not tokens[0, 8:].any()
    assert torch.equal(tokens, open_clip.tokenize("a photo of a cat."))


def test_tokenizer_batch_matches_open_clip(open_clip):
    texts = [
        "A  Photo\tof a DOG!",
        "it's a man's hat, isn't it?",
        "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f600 &amp; &lt;b&gt;",
        "room 101 has 3.14 apples",
        " ".join(["giraffe"] * 100),
        "",
    ]
    assert torch.equal(ClipTokenizer()(texts), open_clip.tokenize(texts))
    rng = random.Random(1)
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCXYZ 0123456789 .,!?'\"-&;<>() \u00e9\u00df\u4e2d\n"
    fuzz = ["".join(rng.choices(alphabet, k=rng.randint(0, 90))) for _ in range(200)]
    assert torch.equal(ClipTokenizer()(fuzz), open_clip.tokenize(fuzz))


def test_tokenizer_truncation_keeps_eot(open_clip):
    tok = ClipTokenizer()
    long = " ".join(f"word{i}" for i in range(100))
    full = [SOT_TOKEN, *tok.encode(long), EOT_TOKEN]
    assert len(full) > CONTEXT_LENGTH
    tokens = tok(long)[0]
    assert tokens.tolist() == full[: CONTEXT_LENGTH - 1] + [EOT_TOKEN]
    assert torch.equal(tok(long), open_clip.tokenize(long))
    short = tok("a photo of a cat.", context_length=5)[0]
    assert short.tolist() == A_PHOTO_OF_A_CAT[:4] + [EOT_TOKEN]


def test_tokenizer_empty_string_and_vocab():
    tok = ClipTokenizer()
    empty = tok("")
    assert empty[0, :2].tolist() == [SOT_TOKEN, EOT_TOKEN] and not empty[0, 2:].any()
    assert tok.vocab_size == 49408 == EOT_TOKEN + 1
    assert tok([], context_length=7).shape == (0, 7)
    with pytest.raises(ValueError, match="context_length"):
        tok("a", context_length=1)


def test_tokenizer_pickles_without_its_tables():
    tok = ClipTokenizer()
    tok("load the tables")
    blob = pickle.dumps(tok)
    assert len(blob) < 1000
    assert torch.equal(
        pickle.loads(blob)("a photo of a cat.")[0, :8], torch.tensor(A_PHOTO_OF_A_CAT)
    )


# --- templates -------------------------------------------------------------------------------


def test_imagenet_templates(open_clip):
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    assert isinstance(IMAGENET_TEMPLATES, tuple) and len(IMAGENET_TEMPLATES) == 80
    assert len(set(IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert [t.format("dog") for t in IMAGENET_TEMPLATES] == [
        make("dog") for make in OPENAI_IMAGENET_TEMPLATES
    ]
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert EVAL_TEMPLATE.format("cat") == "a photo of a cat."


def test_apply_template():
    assert apply_template("dog", random.Random(0), templates=("x {} y",)) == "x dog y"
    assert apply_template(PAD_LABEL, random.Random(0)) == PAD_LABEL
    seen = {apply_template("dog", random.Random(seed)) for seed in range(300)}
    assert seen <= {t.format("dog") for t in IMAGENET_TEMPLATES} and len(seen) > 40
    a = [apply_template("dog", random.Random(5)) for _ in range(3)]
    assert len(set(a)) == 1
    with pytest.raises(ValueError):
        apply_template("dog", random.Random(0), templates=())


# --- tagging with a real (tiny, trained here) NLTK tagger ------------------------------------


def test_tokenize_caption_lowercases_and_splits_periods():
    assert tokenize_caption("A black Dog runs.") == ["a", "black", "dog", "runs", "."]
    assert tokenize_caption("Two dogs. A man.") == ["two", "dogs", ".", "a", "man", "."]
    assert tokenize_caption("") == []


def test_trained_tagger_nouns_and_phrases(trained_tagger):
    caption = "a black dog runs on the green grass"
    assert extract_nouns(caption, trained_tagger) == ["dog", "grass"]
    assert extract_noun_phrases(caption, trained_tagger) == ["black dog", "green grass"]
    assert extract_nouns(caption, trained_tagger, keep_tags=REFERENCE_WORD_TAGS) == [
        "dog",
        "runs",
        "grass",
    ]
    caption = "A small cat sleeps on the red sofa."
    assert extract_nouns(caption, trained_tagger) == ["cat", "sofa"]
    assert extract_noun_phrases(caption, trained_tagger) == ["small cat", "red sofa"]


def test_trained_tagger_multi_sentence_caption(trained_tagger):
    caption = "Two white dogs play in the green field. A man sits on a bench."
    assert extract_nouns(caption, trained_tagger) == ["dogs", "field", "man", "bench"]
    assert candidate_labels(caption, "noun_phrases+nouns", trained_tagger) == [
        "white dogs",
        "green field",
        "man",
        "bench",
        "dogs",
        "field",
    ]


def test_trained_tagger_through_caption_labeler(trained_tagger):
    labeler = CaptionLabeler(k=5, kind="noun_phrases+nouns", pad="pad", tagger=trained_tagger)
    out = labeler("A black dog runs on the green grass.", random.Random(0))
    assert out["labels"] == ["black dog", "green grass", "dog", "grass", PAD_LABEL]
    assert out["label_mask"].tolist() == [True, True, True, True, False]


def test_nltk_tagger_missing_model_says_how_to_install(monkeypatch):
    def missing(*args, **kwargs):
        raise LookupError("Resource averaged_perceptron_tagger_eng not found.")

    monkeypatch.setattr("nltk.tag.perceptron.PerceptronTagger", missing)
    tagger = nltk_pos_tagger()
    with pytest.raises(
        LookupError, match="python -m nltk.downloader averaged_perceptron_tagger_eng"
    ):
        tagger(["a", "dog"])
    with pytest.raises(TypeError):
        tagger("a dog")


def test_nltk_tagger_pickles_without_model(trained_tagger):
    tagger = nltk_pos_tagger()
    assert isinstance(tagger, NltkPosTagger)
    tagger._model = PerceptronTagger(load=False)
    assert pickle.loads(pickle.dumps(tagger))._model is None


# --- exact behaviour with a dict tagger ------------------------------------------------------


def test_extraction_with_dict_tagger():
    assert extract_nouns("the dog and the old dog near dogs", DICT_TAGGER) == ["dog", "dogs"]
    assert extract_nouns(CAPTION, DICT_TAGGER) == ["dog", "grass", "tree"]
    assert extract_noun_phrases(CAPTION, DICT_TAGGER) == ["black dog", "green grass", "tree"]
    assert extract_noun_phrases("a big red bus near a man and a tennis racket", DICT_TAGGER) == [
        "big red bus",
        "man",
        "tennis racket",
    ]
    # an adjective without a noun is no phrase
    assert extract_noun_phrases("a red and black", DICT_TAGGER) == []
    # a tagger calling punctuation a noun must not produce punctuation labels
    assert extract_nouns("dog , grass .", DictTagger({}, default="NN")) == ["dog", "grass"]
    assert extract_nouns("", DICT_TAGGER) == []


def test_candidate_labels_kinds():
    assert candidate_labels(CAPTION, "nouns", DICT_TAGGER) == ["dog", "grass", "tree"]
    assert candidate_labels(CAPTION, "noun_phrases", DICT_TAGGER) == [
        "black dog",
        "green grass",
        "tree",
    ]
    assert candidate_labels(CAPTION, "noun_phrases+nouns", DICT_TAGGER) == CANDIDATES
    assert candidate_labels("A Dog.", "caption", DICT_TAGGER) == ["A Dog."]


def test_select_labels_pad_modes():
    rng = random.Random(0)
    labels, mask = select_labels(CAPTION, 5, "nouns", "pad", DICT_TAGGER, rng)
    assert labels == ["dog", "grass", "tree", PAD_LABEL, PAD_LABEL]
    assert mask == [True, True, True, False, False]
    labels, mask = select_labels(CAPTION, 5, "nouns", "caption", DICT_TAGGER, rng)
    assert labels == ["dog", "grass", "tree", CAPTION, CAPTION]
    assert mask == [True] * 5
    labels, mask = select_labels(CAPTION, 3, "nouns", "pad", DICT_TAGGER, rng)
    assert labels == ["dog", "grass", "tree"] and mask == [True] * 3
    labels, mask = select_labels("a the", 2, "nouns", "pad", DICT_TAGGER, rng)
    assert labels == [PAD_LABEL, PAD_LABEL] and mask == [False, False]


def test_select_labels_random_subset_keeps_caption_order():
    subsets = set()
    for seed in range(200):
        labels, mask = select_labels(
            CAPTION, 3, "noun_phrases+nouns", "pad", DICT_TAGGER, random.Random(seed)
        )
        assert mask == [True] * 3 and len(set(labels)) == 3
        assert labels == [c for c in CANDIDATES if c in labels]  # a subsequence
        subsets.add(tuple(labels))
    assert subsets == set(itertools.combinations(CANDIDATES, 3))
    again = [
        select_labels(CAPTION, 2, "noun_phrases+nouns", "pad", DICT_TAGGER, random.Random(7))
        for _ in range(2)
    ]
    assert again[0] == again[1]


def test_select_labels_kind_caption():
    caption = "A black dog."
    labels, mask = select_labels(caption, 3, "caption", "caption", DICT_TAGGER, random.Random(0))
    assert labels == [caption] * 3 and mask == [True] * 3
    labels, mask = select_labels(caption, 3, "caption", "pad", DICT_TAGGER, random.Random(0))
    assert labels == [caption, PAD_LABEL, PAD_LABEL] and mask == [True, False, False]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "verbs"}, "noun_phrases\\+nouns"),
        ({"pad": "zeros"}, "'caption', 'pad'"),
        ({"k": 0}, "k must be"),
    ],
)
def test_invalid_choices_raise(kwargs, message):
    args = {"k": 3, "kind": "nouns", "pad": "pad"} | kwargs
    with pytest.raises(ValueError, match=message):
        select_labels(CAPTION, tagger=DICT_TAGGER, rng=random.Random(0), **args)
    with pytest.raises(ValueError, match=message):
        CaptionLabeler(tagger=DICT_TAGGER, **args)


# --- CaptionLabeler --------------------------------------------------------------------------


def test_caption_labeler_outputs():
    tok = ClipTokenizer()
    labeler = CaptionLabeler(
        k=5, kind="noun_phrases+nouns", pad="pad", tagger=DICT_TAGGER, templates=("a {} here",)
    )
    out = labeler("A black dog on green grass.", random.Random(0))
    assert set(out) == {"caption_tokens", "label_tokens", "label_mask", "labels"}
    assert out["caption_tokens"].dtype == torch.long and out["caption_tokens"].shape == (77,)
    assert torch.equal(out["caption_tokens"], tok("A black dog on green grass.")[0])
    assert out["label_tokens"].dtype == torch.long and out["label_tokens"].shape == (5, 77)
    assert out["label_mask"].dtype == torch.bool
    assert out["labels"] == ["black dog", "green grass", "dog", "grass", PAD_LABEL]
    assert out["label_mask"].tolist() == [True, True, True, True, False]
    prompts = ["a black dog here", "a green grass here", "a dog here", "a grass here", ""]
    assert torch.equal(out["label_tokens"], tok(prompts))


def test_caption_labeler_caption_padding_is_not_templated():
    tok = ClipTokenizer()
    caption = "a dog near a tree"
    labeler = CaptionLabeler(
        k=3, kind="nouns", pad="caption", tagger=DICT_TAGGER, templates=("x {}",)
    )
    out = labeler(caption, random.Random(0))
    assert out["labels"] == ["dog", "tree", caption]
    assert out["label_mask"].tolist() == [True, True, True]
    assert torch.equal(out["label_tokens"], tok(["x dog", "x tree", caption]))

    whole = CaptionLabeler(k=2, kind="caption", pad="caption", tagger=DICT_TAGGER)
    out = whole(caption, random.Random(0))
    assert out["labels"] == [caption, caption]
    assert torch.equal(out["label_tokens"], tok([caption, caption]))


def test_caption_labeler_without_templates_and_short_context():
    tok = ClipTokenizer()
    labeler = CaptionLabeler(
        k=2, kind="nouns", pad="pad", tagger=DICT_TAGGER, use_templates=False, context_length=16
    )
    out = labeler("a dog", random.Random(0))
    assert out["caption_tokens"].shape == (16,) and out["label_tokens"].shape == (2, 16)
    assert torch.equal(out["label_tokens"], tok(["dog", ""], context_length=16))


def test_caption_labeler_is_reproducible_and_random():
    labeler = CaptionLabeler(k=2, kind="noun_phrases+nouns", pad="pad", tagger=DICT_TAGGER)
    runs = [labeler(CAPTION, random.Random(3)) for _ in range(2)]
    assert runs[0]["labels"] == runs[1]["labels"]
    assert torch.equal(runs[0]["label_tokens"], runs[1]["label_tokens"])
    tokens = {
        tuple(labeler(CAPTION, random.Random(s))["label_tokens"][0].tolist()) for s in range(20)
    }
    assert len(tokens) > 5  # templates (and the subset) vary with the stream


def test_caption_labeler_pickles():
    labeler = CaptionLabeler(k=4, kind="noun_phrases+nouns", pad="pad", tagger=DICT_TAGGER)
    before = labeler(CAPTION, random.Random(11))
    blob = pickle.dumps(labeler)
    assert len(blob) < 20_000  # no tokenizer tables inside
    after = pickle.loads(blob)(CAPTION, random.Random(11))
    assert after["labels"] == before["labels"]
    for key in ("caption_tokens", "label_tokens", "label_mask"):
        assert torch.equal(after[key], before[key])


def test_caption_labeler_default_tagger_constructs_and_pickles_offline():
    labeler = CaptionLabeler()
    assert isinstance(labeler.tagger, NltkPosTagger) and labeler.tagger._model is None
    clone = pickle.loads(pickle.dumps(labeler))
    assert (clone.k, clone.kind, clone.pad) == (3, "nouns", "caption")
    assert clone.templates == IMAGENET_TEMPLATES


def test_module_constants():
    assert (T.CONTEXT_LENGTH, T.SOT_TOKEN, T.EOT_TOKEN) == (77, 49406, 49407)
    assert T.PAD_LABEL == "<PAD>" and T.EVAL_TEMPLATE == "a photo of a {}."
