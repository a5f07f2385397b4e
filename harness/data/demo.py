"""The bundled demo task: "which option is the word W?", four words as choices, answered with a letter.

Chosen so that a 135M model learns it within the demo's budget: the base model answers at
chance (it puts every answer on one letter), and LoRA learns the skill (find the matching
option, give its letter) in about 60 steps. It shows the harness at work, not a benchmark
result. Held-out questions use only words that never appear in training.
"""

from __future__ import annotations

import random

LETTERS = ("A", "B", "C", "D")


DEMO_CATEGORIES: dict[str, list[str]] = {  # 256 distinct words (32 in each of 8 categories)
    "fruit": """apple banana cherry grape lemon mango pear melon kiwi apricot fig papaya coconut guava pineapple
        strawberry raspberry blueberry watermelon pomegranate tangerine nectarine cranberry grapefruit lychee
        persimmon quince gooseberry blackberry cantaloupe passionfruit kumquat""".split(),
    "animal": """dog cat horse cow sheep lion tiger bear wolf fox rabbit mouse deer goat zebra monkey camel elephant
        giraffe kangaroo squirrel leopard cheetah hippopotamus rhinoceros donkey otter beaver raccoon hedgehog
        moose badger""".split(),
    "color": """red blue green yellow purple pink brown black white gray violet indigo crimson maroon teal beige
        turquoise magenta scarlet lavender navy cyan amber ivory burgundy chartreuse fuchsia ochre vermilion
        cerulean mauve taupe""".split(),
    "country": """France Spain Italy Germany Japan India Brazil Canada Mexico Egypt Kenya Norway Sweden Peru Greece
        Argentina Australia Vietnam Thailand Nigeria Poland Portugal Ireland Finland Denmark Austria Belgium
        Colombia Morocco Pakistan Indonesia Switzerland""".split(),
    "vehicle": """car bus truck bicycle train airplane boat motorcycle tram scooter helicopter van taxi subway tractor
        canoe rocket sailboat yacht ambulance limousine minivan jeep bulldozer forklift trolley kayak glider
        snowmobile submarine skateboard hovercraft""".split(),
    "instrument": """piano guitar violin drum flute trumpet cello harp saxophone clarinet banjo oboe tuba trombone
        ukulele accordion harmonica mandolin bassoon xylophone tambourine viola piccolo bagpipes sitar
        harpsichord marimba cymbal bugle lute zither glockenspiel""".split(),
    "body part": """hand foot arm leg head knee elbow shoulder finger toe ear nose mouth eye neck wrist ankle chin
        thumb forehead eyebrow cheek lip tongue tooth heel hip thigh stomach lung kidney liver""".split(),
    "tool": """hammer wrench screwdriver drill shovel rake chisel pliers axe ladder crowbar trowel mallet sander
        clamp hacksaw pickaxe wheelbarrow sledgehammer scissors tweezers spanner awl vise hoe pitchfork shears
        plunger stapler multimeter jigsaw sickle""".split(),
}
DEMO_SUBJECT = "word matching"


def format_mc(question: str, choices: list[str], subject: str) -> str:
    """MMLU's zero-shot prompt (lm-eval's default template plus its subject description)."""
    lines = [f"The following are multiple choice questions (with answers) about {subject}.", "", question.strip()]
    lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices, strict=True)]
    return "\n".join(lines) + "\nAnswer:"


def make_demo(n_train: int, n_heldout: int, seed: int, n_validation: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """Generate the demo task (seeded): multiple-choice rows for training, held-out eval and validation.

    The 256 words are split in halves; each split's questions and distractors use only its own
    words, so no held-out word, and no held-out question, appears in training. Training rows
    cycle through their words (repeating them when n_train is larger); the held-out split asks
    about each held-out word once, at most n_heldout. ``n_validation`` > 0 takes that many words
    of the training half (at most half of it) for validation questions, each word once, on their own
    distractors: disjoint from training and held-out words. At 0 the rows are those of before.
    """
    rng = random.Random(seed)
    words = sorted(w for ws in DEMO_CATEGORIES.values() for w in ws)
    rng.shuffle(words)
    half = len(words) // 2
    n_val = min(n_validation, half // 2)
    pools = {"train": words[n_val:half], "heldout": words[half:], "validation": words[:n_val]}

    def draw(split: str, n: int) -> list[dict]:
        pool = pools[split]
        if split != "train":  # every held-out (validation) question once: repeats would fake precision
            n = min(n, len(pool))
        rows = []
        for i in range(n):
            word = pool[i % len(pool)]
            distractors = rng.sample([w for w in pool if w != word], 3)
            target = rng.randrange(4)
            choices = distractors[:target] + [word] + distractors[target:]
            rows.append({"id": f"{split}-{i}", "question": f'Which option is the word "{word}"?',
                         "choices": choices, "answer": target, "subject": DEMO_SUBJECT})
        return rows

    train, heldout = draw("train", n_train), draw("heldout", n_heldout)
    return train, heldout, draw("validation", n_val) if n_val else []
