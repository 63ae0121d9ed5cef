"""Knowledge of invented entities: facts only a trained adapter can hold.

The world
---------
:data:`ENTITIES` people with invented names (two invented syllable pairs, unique), each with three
facts: a hometown (one of :data:`TOWN_COUNT` invented town names), a profession (one of
:data:`PROFESSIONS`) and a birth year (1720-1979) -- all drawn from ``random.Random(WORLD_SEED)``,
so the world is the same in every run and on every machine, and no pretrained model can know it.

Questions are templated per attribute; the train split asks with :data:`TRAIN_QUESTIONS` (one of
two phrasings per fact, alternating), validation and test with :data:`TEST_QUESTIONS` (a third
phrasing), so no test sample equals a train sample.  Targets are ``"The answer is X."``; the
scorer compares the answer of the answer sentence case-insensitively (:func:`~.base.extract_answer`).

The split design
----------------
The ``3 * ENTITIES`` facts are partitioned once (``random.Random("knowledge-held")``) into
*held* facts -- :data:`TEST_FACTS` for test and :data:`VALIDATION_FACTS` for validation -- and
the remaining *public* facts.

* ``train`` (all the facts: the old adapter's full training set, ``task:knowledge:train``) lists
  the public facts first (shuffled by the seed), then the held facts (shuffled by the seed).
  So a prefix of up to ``PUBLIC`` samples -- the 100-sample LFT split ``task:knowledge:train:100``,
  a vanilla LoRA's 100 labelled samples -- never holds a held fact, while an adapter trained on
  the whole split has seen every test and validation fact once.
* ``test`` and ``validation`` ask the held facts only.

What it measures: a migrated adapter keeps the old adapter's knowledge of the held facts, which
LFT on 100 samples and a fresh LoRA on them cannot teach (a model without the old adapter is at
chance: 1/24 for a profession, about 1/40 for a town, 1/260 for a year).  Validation asks held
facts as test does, so a learning rate chosen on it is chosen for that, not for the LFT facts.
"""
from __future__ import annotations

import random

from lorasuite_core.training.skills.base import FORMAT_LINE, Skill, check_split, clean_answer
from lorasuite_core.training.task_data import Sample

WORLD_SEED = 20260
ENTITIES = 200
TOWN_COUNT = 40
TEST_FACTS = 150
VALIDATION_FACTS = 50
PUBLIC = 3 * ENTITIES - TEST_FACTS - VALIDATION_FACTS  # 400
PROFESSIONS = ("glassblower", "astronomer", "beekeeper", "cartographer", "blacksmith", "violinist", "botanist",
               "lighthouse keeper", "potter", "watchmaker", "shipwright", "librarian", "falconer", "weaver",
               "architect", "chemist", "stonemason", "translator", "baker", "surveyor", "tailor", "printer",
               "apothecary", "sculptor")
ATTRIBUTES = ("hometown", "profession", "birth_year")
TRAIN_QUESTIONS = {
    "hometown": ("Which town does {name} come from?", "{name} grew up in which town?"),
    "profession": ("What is {name}'s job?", "What does {name} do for a living?"),
    "birth_year": ("In which year was {name} born?", "{name} was born in what year?"),
}
TEST_QUESTIONS = {
    "hometown": "What is the hometown of {name}?",
    "profession": "What is the profession of {name}?",
    "birth_year": "What is the birth year of {name}?",
}
_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "th", "v", "z", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "io", "y")
_CODAS = ("", "n", "r", "l", "s", "th", "m", "x", "nd", "rk")
_TOWN_ENDS = ("moor", "ford", "holm", "wick", "dale", "mere", "stead", "gate")


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _unique(rng: random.Random, count: int, make) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = make(rng)
        if name not in names:
            names.append(name)
    return names


def build_world() -> list[dict]:
    """The entities and their facts (deterministic: ``random.Random(WORLD_SEED)``)."""
    rng = random.Random(WORLD_SEED)
    towns = _unique(rng, TOWN_COUNT, lambda r: (_syllable(r) + r.choice(_TOWN_ENDS)).capitalize())
    names = _unique(rng, ENTITIES, lambda r: f"{(_syllable(r) + _syllable(r)).capitalize()} "
                                             f"{(_syllable(r) + _syllable(r)).capitalize()}")
    return [{"name": name, "hometown": rng.choice(towns), "profession": rng.choice(PROFESSIONS),
             "birth_year": str(rng.randint(1720, 1979))} for name in names]


class KnowledgeSkill(Skill):
    max_new_tokens = 24
    data_version = "1"

    def __init__(self, name: str):
        super().__init__(name)
        self.world = build_world()
        facts = [(entity, attribute) for entity in range(ENTITIES) for attribute in ATTRIBUTES]
        random.Random("knowledge-held").shuffle(facts)
        self.test_facts = facts[:TEST_FACTS]
        self.validation_facts = facts[TEST_FACTS:TEST_FACTS + VALIDATION_FACTS]
        self.public_facts = facts[TEST_FACTS + VALIDATION_FACTS:]
        self._public = frozenset(self.public_facts)

    def split_size(self, split: str) -> int | None:
        check_split(split)
        return {"train": ENTITIES * len(ATTRIBUTES), "validation": VALIDATION_FACTS, "test": TEST_FACTS}[split]

    def samples(self, split: str, n: int, seed: int) -> list[Sample]:
        self._check_count(split, n)
        rng = random.Random(f"{split}:{seed}")
        if split == "train":
            public, held = list(self.public_facts), self.test_facts + self.validation_facts
            rng.shuffle(public)
            rng.shuffle(held)
            facts = public + held
        else:
            facts = list(self.test_facts if split == "test" else self.validation_facts)
            rng.shuffle(facts)
        return [self._make(entity, attribute, split) for entity, attribute in facts[:n]]

    def _make(self, entity: int, attribute: str, split: str) -> Sample:
        person = self.world[entity]
        if split == "train":
            phrasings = TRAIN_QUESTIONS[attribute]
            template = phrasings[(entity + ATTRIBUTES.index(attribute)) % len(phrasings)]
        else:
            template = TEST_QUESTIONS[attribute]
        question = template.format(name=person["name"])
        return self._sample(f"{question}\n{FORMAT_LINE}", person[attribute],
                            meta={"entity": entity, "attribute": attribute,
                                  "held": (entity, attribute) not in self._public})

    def is_correct(self, answer: str | None, sample: Sample) -> bool:
        return answer is not None and clean_answer(answer).casefold() == sample.answer.casefold()
