"""Twenty questions (after LMRL-Gym's twenty-questions task) against a scripted oracle.

The oracle thinks of one of ``candidates`` objects, named in the first observation,
and answers yes/no questions about a fixed table of attributes (it recognises a
question by its keyword: "Is it alive?", "Can it fly?", ...) or a guess ("Is it a
dog?"). A right guess ends the episode with reward 1. An instance is the shown
candidate set and the secret, so held-out instances are unseen candidate sets.
"""

from __future__ import annotations

import dataclasses
import random
import re

from rlkit.envs.base import Environment, StepResult, register_environment

# attribute -> (the expert's question, the pattern the oracle recognises it by)
QUESTIONS = {
    "alive": ("Is it alive?", r"\balive|\bliving"),
    "animal": ("Is it an animal?", r"\banimal"),
    "plant": ("Is it a plant?", r"\bplant"),
    "food": ("Can you eat it?", r"\beat|\bfood|\bedible"),
    "sweet": ("Is it sweet?", r"\bsweet"),
    "big": ("Is it bigger than a person?", r"\bbig|\blarge"),
    "tiny": ("Is it smaller than a hand?", r"\bsmall|\btiny"),
    "metal": ("Is it made of metal?", r"\bmetal"),
    "wood": ("Is it made of wood?", r"\bwood"),
    "electric": ("Does it use electricity?", r"\belectric"),
    "wheels": ("Does it have wheels?", r"\bwheel"),
    "legs": ("Does it have legs?", r"\blegs?\b"),
    "flies": ("Can it fly?", r"\bfly|\bflies"),
    "water": ("Does it live in water?", r"\bwater|\bswim"),
    "indoors": ("Is it kept indoors?", r"\bindoors?|\binside"),
    "tool": ("Is it a tool?", r"\btools?\b"),
}

OBJECTS = {
    "dog": {"alive", "animal", "legs"},
    "cat": {"alive", "animal", "legs", "indoors"},
    "horse": {"alive", "animal", "legs", "big"},
    "cow": {"alive", "animal", "legs", "big", "food"},
    "chicken": {"alive", "animal", "legs", "food"},
    "eagle": {"alive", "animal", "legs", "flies"},
    "duck": {"alive", "animal", "legs", "flies", "water", "food"},
    "bee": {"alive", "animal", "legs", "flies", "tiny"},
    "ant": {"alive", "animal", "legs", "tiny"},
    "frog": {"alive", "animal", "legs", "water"},
    "fish": {"alive", "animal", "water", "food"},
    "whale": {"alive", "animal", "water", "big"},
    "snake": {"alive", "animal"},
    "tree": {"alive", "plant", "big", "wood"},
    "rose": {"alive", "plant"},
    "apple": {"plant", "food", "sweet"},
    "carrot": {"plant", "food"},
    "bread": {"food", "indoors"},
    "cake": {"food", "sweet", "indoors"},
    "car": {"metal", "wheels", "big"},
    "bicycle": {"metal", "wheels"},
    "train": {"metal", "wheels", "big", "electric"},
    "airplane": {"metal", "wheels", "big", "flies"},
    "boat": {"wood", "water", "big"},
    "ship": {"metal", "water", "big"},
    "hammer": {"tool", "metal", "wood"},
    "knife": {"tool", "metal", "indoors"},
    "spoon": {"metal", "indoors", "tiny"},
    "key": {"metal", "tiny", "tool"},
    "coin": {"metal", "tiny"},
    "pencil": {"wood", "tool", "tiny"},
    "chair": {"wood", "legs", "indoors"},
    "bed": {"wood", "legs", "indoors", "big"},
    "guitar": {"wood"},
    "lamp": {"electric", "indoors"},
    "computer": {"electric", "indoors", "metal"},
    "phone": {"electric", "tiny"},
    "book": {"indoors"},
    "house": {"big", "wood"},
    "ball": set(),
}
GUESS_PATTERN = re.compile(r"\b(" + "|".join(sorted(OBJECTS, key=len, reverse=True)) + r")\b")


@register_environment("twenty_questions")
class TwentyQuestionsEnv(Environment):
    system_prompt = "I think of one of the objects. Ask yes/no questions, then guess: Is it a ...?"

    @dataclasses.dataclass
    class Options(Environment.Options):
        candidates: int = 8  # objects named in the first observation, the secret among them
        max_turns: int = 10

        def check(self) -> None:
            super().check()
            self.require(2 <= self.candidates <= len(OBJECTS), "candidates", f"must be in 2..{len(OBJECTS)}")

    def generate_row(self, rng: random.Random) -> dict:
        candidates = sorted(rng.sample(sorted(OBJECTS), self.options.candidates))
        return {"secret": rng.choice(candidates), "candidates": candidates}

    def reset(self, row: dict) -> str:
        self.secret = row["secret"]
        self.candidates = list(row["candidates"])
        self.answers: dict[str, bool] = {}
        self.wrong_guesses: set[str] = set()
        return f"One of: {', '.join(self.candidates)}."

    def step(self, action: str) -> StepResult:
        text = action.lower()
        guess = GUESS_PATTERN.search(text)
        if guess:
            name = guess.group(1)
            if name == self.secret:
                return StepResult(f"Yes, it is {article(name)}!", 1.0, True)
            self.wrong_guesses.add(name)
            return StepResult(f"No, it is not {article(name)}.", 0.0, False)
        attribute = next((a for a, (_, pattern) in QUESTIONS.items() if re.search(pattern, text)), None)
        if attribute is None:
            return StepResult("I can only answer yes/no questions.", 0.0, False, {"invalid_action": 1})
        self.answers[attribute] = attribute in OBJECTS[self.secret]
        return StepResult("Yes." if self.answers[attribute] else "No.", 0.0, False)

    def state_key(self) -> tuple:
        return tuple(sorted(self.answers.items())), tuple(sorted(self.wrong_guesses))

    def expert_action(self) -> str:
        """Guess when one candidate fits the answers; otherwise ask the question that
        splits the fitting candidates most evenly (ties: table order)."""
        fitting = [
            name
            for name in self.candidates
            if name not in self.wrong_guesses
            and all((a in OBJECTS[name]) == answer for a, answer in self.answers.items())
        ]
        splits = {a: sum(a in OBJECTS[name] for name in fitting) for a in QUESTIONS if a not in self.answers}
        best = max(splits, key=lambda a: min(splits[a], len(fitting) - splits[a]), default=None)
        if len(fitting) == 1 or best is None or min(splits[best], len(fitting) - splits[best]) == 0:
            return f"Is it {article(fitting[0])}?"
        return QUESTIONS[best][0]


def article(name: str) -> str:
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
