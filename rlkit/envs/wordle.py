"""Wordle (after LMRL-Gym's wordle task): find a secret 5-letter word in six guesses.

After each guess the observation marks every letter G (right letter, right place),
Y (in the word, elsewhere) or - (not in the word, or no further copy of it), with
Wordle's rule for repeated letters. The word list is embedded (472 common
English words); ``vocabulary`` restricts guesses and secrets to a fixed subset of it
for small models. The held-out split holds out secret words.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter

from rlkit.envs.base import Environment, StepResult, register_environment

WORD_LIST = """
    about above actor acute admit adopt adult after again agent agree ahead alarm album alert alike alive allow
    alone along alter angel anger angle angry apple apply arena argue arise armor array arrow aside asset audio
    avoid award aware badge baker basic beach beard beast begin being below bench berry birth black blade blame
    blank blast blend blind block blood bloom board boast bonus boost booth bound brain brand brave bread break
    brick bride brief bring broad brown brush build bunch burst buyer cabin cable camel candy cargo carry catch
    cause chain chair chalk charm chart chase cheap check cheek chess chest chief child chill choir civil claim
    class clean clear clerk click cliff climb clock close cloud coach coast coral count court cover crack craft
    crane crash cream crime crisp cross crowd crown crude curve cycle daily dance delay depth diary dirty doubt
    dozen draft drain drama dream dress drink drive eager early earth eight elbow elder empty enemy enjoy enter
    entry equal error event every exact exist extra faith false fancy feast fence fever field fifth fight final
    flame flash fleet flesh float flood floor flour fluid focus force forth frame fresh front frost fruit funny
    ghost giant given glass globe glove grace grade grain grand grant grape grass great green grief group guard
    guess guest guide habit happy heart heavy hello honey horse hotel house human humor ideal image index inner
    input issue jelly jewel joint judge juice knife known label labor large laser later laugh layer lemon level
    light limit linen liver local logic loose lucky lunch magic major maple march match mayor medal metal meter
    might minor model money month moral motor mount mouse mouth movie music nerve never night noble noise north
    novel nurse ocean offer olive onion opera orbit order other outer owner paint panel paper party pasta peace
    pearl phase phone photo piano piece pilot pitch pizza place plain plane plant plate point pound power press
    price pride prime print prize proof proud queen quick quiet quite radio raise range rapid ratio reach ready
    realm river roast robot rocky round route royal rural salad sauce scale scene scope score sense serve seven
    shade shape share sharp sheep shelf shell shift shine shirt shock shore short sight skill skirt sleep slice
    smile smoke snake solar solid sound south space spare speak speed spell spend spice spine spoon sport staff
    stage stair stamp stand start steam steel stick stone storm story stove straw strip study style sugar sweet
    table taste teach thick thing think three tiger title toast today tooth topic total touch tower track trade
    train treat trend trial tribe truck trust truth twice uncle under union unity upper urban usual valid value
    video visit vital voice waste watch water wheat wheel where white whole woman world worry wound write wrong
    yield young youth zebra
"""
WORDS = WORD_LIST.split()
WORD_PATTERN = re.compile(r"\b[a-z]{5}\b")


@register_environment("wordle")
class WordleEnv(Environment):
    system_prompt = "Guess the 5-letter word. G: right place. Y: wrong place. -: not in the word."

    @dataclasses.dataclass
    class Options(Environment.Options):
        vocabulary: int = 0  # use this many words of the list (a fixed random subset); 0 = all
        max_guesses: int = 6
        test_size: int = 100
        max_turns: int = 8  # replies, invalid ones included

        def check(self) -> None:
            super().check()
            size = self.vocabulary
            self.require(size == 0 or 2 <= size <= len(WORDS), "vocabulary", f"use 0 (all) or 2..{len(WORDS)}")
            self.require_at_least_one("max_guesses")

    def __init__(self, options=None):
        super().__init__(options)
        size = self.options.vocabulary
        self.words = sorted(random.Random(0).sample(WORDS, size)) if size else WORDS
        self.known = set(self.words)

    def generate_row(self, rng: random.Random) -> dict:
        return {"secret": rng.choice(self.words)}

    def reset(self, row: dict) -> str:
        self.secret = row["secret"]
        self.history: list[tuple[str, str]] = []
        return f"{self.options.max_guesses} guesses left."

    def step(self, action: str) -> StepResult:
        left = self.options.max_guesses - len(self.history)
        guess = next((w for w in WORD_PATTERN.findall(action.lower()) if w in self.known), None)
        if guess is None:
            return StepResult(f"Not a word I know. {left} guesses left.", 0.0, False, {"invalid_action": 1})
        marks = feedback(guess, self.secret)
        self.history.append((guess, marks))
        if guess == self.secret:
            return StepResult(f"{guess}: {marks}. Solved!", 1.0, True)
        if left == 1:
            return StepResult(f"{guess}: {marks}. Out of guesses; the word was {self.secret}.", 0.0, True)
        return StepResult(f"{guess}: {marks}. {left - 1} guesses left.", 0.0, False)

    def state_key(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(self.history))

    def expert_action(self) -> str:
        """A word consistent with every feedback so far, the one whose distinct letters
        are most common among the remaining candidates (ties: alphabetical)."""
        candidates = [w for w in self.words if all(feedback(g, w) == m for g, m in self.history)]
        counts = Counter(letter for word in candidates for letter in set(word))
        return max(candidates, key=lambda w: (sum(counts[letter] for letter in set(w)), [-ord(ch) for ch in w]))


def feedback(guess: str, secret: str) -> str:
    """G/Y/- per letter: greens first, then yellows while unmatched copies of the letter remain."""
    marks = ["G" if g == s else "-" for g, s in zip(guess, secret)]
    unmatched = Counter(s for s, mark in zip(secret, marks) if mark != "G")
    for i, letter in enumerate(guess):
        if marks[i] != "G" and unmatched[letter]:
            marks[i] = "Y"
            unmatched[letter] -= 1
    return "".join(marks)
