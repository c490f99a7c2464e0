"""A small hand-tagged sample of caption-like sentences (Penn Treebank tags).

NLTK's real tagger model must be downloaded (`python -m nltk.downloader
averaged_perceptron_tagger_eng`); machines without a network train NLTK's own perceptron tagger
on this sample instead (`groupvit.labels.tagger=sample`). It covers the synthetic captions'
vocabulary and common COCO caption patterns; on real captions use the downloaded model.
"""

from __future__ import annotations

import random
from functools import lru_cache

TAGGED_CAPTIONS = """\
a/DT black/JJ dog/NN runs/VBZ on/IN the/DT green/JJ grass/NN ./.
a/DT man/NN riding/VBG a/DT red/JJ bike/NN down/IN the/DT street/NN ./.
two/CD cats/NNS sitting/VBG on/IN a/DT wooden/JJ bench/NN ./.
a/DT woman/NN holding/VBG an/DT umbrella/NN in/IN the/DT rain/NN ./.
there/EX is/VBZ a/DT sheep/NN in/IN a/DT field/NN ./.
there/EX are/VBP two/CD orange/JJ cats/NNS and/CC a/DT yellow/JJ boat/NN in/IN a/DT field/NN
two/CD orange/JJ cats/NNS and/CC a/DT big/JJ yellow/JJ boat/NN seen/VBN from/IN above/RB ./.
two/CD cats/NNS with/IN a/DT large/JJ yellow/JJ boat/NN outside/RB ./.
a/DT picture/NN of/IN a/DT big/JJ boat/NN near/IN two/CD orange/JJ cats/NNS in/IN a/DT field/NN ./.
a/DT large/JJ white/JJ sheep/NN seen/VBN from/IN above/RB
a/DT sheep/NN on/IN the/DT grass/NN ./.
close/RB up/RB of/IN a/DT sheep/NN
here/RB we/PRP see/VBP a/DT large/JJ white/JJ sheep/NN on/IN the/DT grass/NN
a/DT big/JJ sheep/NN standing/VBG on/IN the/DT grass/NN
a/DT photo/NN of/IN two/CD red/JJ cars/NNS ./.
two/CD red/JJ cars/NNS outside/RB ./.
there/EX are/VBP two/CD cars/NNS on/IN the/DT pavement/NN
here/RB we/PRP see/VBP a/DT large/JJ red/JJ car/NN beside/IN a/DT boat/NN on/IN the/DT grass/NN ./.
a/DT photo/NN of/IN a/DT boat/NN with/IN a/DT red/JJ car/NN
a/DT picture/NN of/IN a/DT boat/NN near/IN a/DT car/NN on/IN the/DT sand/NN ./.
there/EX is/VBZ a/DT boat/NN next/JJ to/TO a/DT red/JJ car/NN on/IN the/DT grass/NN ./.
a/DT small/JJ blue/JJ bird/NN perched/VBN on/IN the/DT sand/NN
three/CD little/JJ birds/NNS resting/VBG in/IN a/DT field/NN ./.
a/DT tiny/JJ bird/NN and/CC a/DT white/JJ sheep/NN grazing/VBG outside/RB
a/DT red/JJ car/NN parked/VBN next/JJ to/TO three/CD blue/JJ birds/NNS ./.
an/DT orange/JJ cat/NN lying/VBG on/IN the/DT pavement/NN
a/DT yellow/JJ boat/NN waiting/VBG on/IN the/DT sand/NN ./.
two/CD white/JJ sheep/NNS standing/VBG beside/IN a/DT small/JJ cat/NN
a/DT little/JJ cat/NN sitting/VBG near/IN two/CD boats/NNS
a/DT plate/NN of/IN food/NN with/IN broccoli/NN and/CC rice/NN ./.
a/DT group/NN of/IN people/NNS standing/VBG around/IN a/DT kitchen/NN ./.
a/DT giraffe/NN eating/VBG leaves/NNS from/IN a/DT tall/JJ tree/NN ./.
a/DT bus/NN driving/VBG down/IN a/DT busy/JJ city/NN street/NN ./.
the/DT young/JJ boy/NN is/VBZ playing/VBG with/IN a/DT frisbee/NN ./.
an/DT old/JJ train/NN sitting/VBG on/IN the/DT tracks/NNS ./.
a/DT large/JJ airplane/NN flying/VBG through/IN a/DT blue/JJ sky/NN ./.
a/DT cat/NN laying/VBG on/IN top/NN of/IN a/DT laptop/NN computer/NN ./.
a/DT bathroom/NN with/IN a/DT white/JJ toilet/NN and/CC a/DT sink/NN ./.
people/NNS are/VBP walking/VBG on/IN the/DT beach/NN near/IN the/DT water/NN ./.
a/DT little/JJ girl/NN holds/VBZ a/DT pink/JJ teddy/NN bear/NN ./.
a/DT pizza/NN with/IN cheese/NN and/CC tomatoes/NNS on/IN a/DT table/NN ./.
some/DT horses/NNS are/VBP grazing/VBG in/IN a/DT green/JJ pasture/NN ./.
a/DT skier/NN goes/VBZ down/IN a/DT snowy/JJ hill/NN ./.
two/CD zebras/NNS standing/VBG next/JJ to/TO each/DT other/JJ ./.
the/DT kitchen/NN has/VBZ a/DT stove/NN and/CC a/DT refrigerator/NN ./.
a/DT brown/JJ horse/NN is/VBZ pulling/VBG a/DT small/JJ cart/NN ./.
a/DT person/NN on/IN a/DT surfboard/NN riding/VBG a/DT wave/NN ./.
a/DT clock/NN tower/NN in/IN the/DT middle/NN of/IN a/DT town/NN ./.
"""


def tagged_sentences() -> list[list[tuple[str, str]]]:
    """The sample as NLTK training data: sentences of (word, tag)."""
    return [
        [tuple(token.rsplit("/", 1)) for token in line.split()]
        for line in TAGGED_CAPTIONS.splitlines()
        if line.strip()
    ]


@lru_cache(maxsize=1)
def _trained_perceptron():
    from nltk.tag.perceptron import PerceptronTagger

    tagger = PerceptronTagger(load=False)
    state = random.getstate()  # NLTK shuffles with the global RNG: fix it, then give it back
    random.seed(0)
    try:
        tagger.train(tagged_sentences(), nr_iter=10)
    finally:
        random.setstate(state)
    return tagger


class SampleTrainedTagger:
    """NLTK's averaged perceptron trained (in < 1 s, deterministically) on `TAGGED_CAPTIONS`.
    Picklable: each process trains its own copy on first use."""

    def __call__(self, words: list[str]) -> list[tuple[str, str]]:
        return _trained_perceptron().tag(list(words))
