"""Text navigation (after LMRL-Gym's text-nav task): fetch an object and bring it to a room.

A house of named rooms joined by doors; the agent sees only its room: the exits,
the objects there and what it carries. Commands: ``go <room>``, ``take <object>``,
``drop <object>``. Reward 1 when the goal object lies in the goal room. The expert
plays fair: it explores (nearest unvisited room first) until it sees the object,
and walks known doors only.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import deque

from rlkit.envs.base import Environment, StepResult, register_environment

ROOMS = ["kitchen", "hall", "bedroom", "bathroom", "garden", "study", "cellar", "attic", "garage", "library"]
ITEMS = ["key", "book", "lamp", "cup", "ball", "coin", "hat", "box"]
COMMAND = re.compile(r"\b(go|take|drop)\s+(?:to\s+|the\s+)*([a-z]+)")


@register_environment("navigation")
class NavigationEnv(Environment):
    system_prompt = "Do the task. Commands: go <room>, take <object>, drop <object>."

    @dataclasses.dataclass
    class Options(Environment.Options):
        rooms: int = 5  # rooms in the house, drawn from a list of 10
        items: int = 2  # objects lying about, the goal object among them
        extra_doors: int = 1  # doors beyond a spanning tree (loops)
        max_turns: int = 16

        def check(self) -> None:
            super().check()
            self.require(2 <= self.rooms <= len(ROOMS), "rooms", f"must be in 2..{len(ROOMS)}")
            self.require(1 <= self.items <= len(ITEMS), "items", f"must be in 1..{len(ITEMS)}")
            self.require_non_negative("extra_doors")

    def generate_row(self, rng: random.Random) -> dict:
        rooms = rng.sample(ROOMS, self.options.rooms)
        doors = {tuple(sorted((room, rng.choice(rooms[:i])))) for i, room in enumerate(rooms) if i}
        for _ in range(self.options.extra_doors):
            doors.add(tuple(sorted(rng.sample(rooms, 2))))
        items = rng.sample(ITEMS, self.options.items)
        where = {item: rng.choice(rooms) for item in items}
        goal_item = items[0]
        goal_room = rng.choice([r for r in rooms if r != where[goal_item]])
        return {
            "doors": sorted([list(d) for d in doors]),
            "items": sorted([item, room] for item, room in where.items()),  # pairs: one column type for every row
            "start": rng.choice(rooms),
            "goal_item": goal_item,
            "goal_room": goal_room,
        }

    def reset(self, row: dict) -> str:
        self.exits: dict[str, list[str]] = {}
        for a, b in row["doors"]:
            self.exits.setdefault(a, []).append(b)
            self.exits.setdefault(b, []).append(a)
        self.items = dict(row["items"])  # item -> room, or "you" while carried
        self.room = row["start"]
        self.goal_item, self.goal_room = row["goal_item"], row["goal_room"]
        self.visited = {self.room}
        return f"Bring the {self.goal_item} to the {self.goal_room}. " + self.describe()

    def describe(self) -> str:
        here = sorted(item for item, place in self.items.items() if place == self.room)
        carried = sorted(item for item, place in self.items.items() if place == "you")
        return (
            f"In the {self.room}. Exits: {', '.join(sorted(self.exits[self.room]))}. "
            f"Here: {', '.join(here) or 'nothing'}. Carrying: {', '.join(carried) or 'nothing'}."
        )

    def step(self, action: str) -> StepResult:
        match = COMMAND.search(action.lower())
        verb, name = match.groups() if match else (None, None)
        if verb == "go" and name in self.exits[self.room]:
            self.room = name
            self.visited.add(name)
        elif verb == "take" and self.items.get(name) == self.room:
            self.items[name] = "you"
        elif verb == "drop" and self.items.get(name) == "you":
            self.items[name] = self.room
            if name == self.goal_item and self.room == self.goal_room:
                return StepResult(f"You dropped the {name} in the {self.room}. Done!", 1.0, True)
        else:
            return StepResult("You can't do that. " + self.describe(), 0.0, False, {"invalid_action": 1})
        return StepResult(self.describe(), 0.0, False)

    def state_key(self) -> tuple:
        return self.room, tuple(sorted(self.items.items()))

    def expert_action(self) -> str:
        place = self.items[self.goal_item]
        if place == "you":
            if self.room == self.goal_room:
                return f"drop {self.goal_item}"
            target = self.goal_room
        elif place == self.room:
            return f"take {self.goal_item}"
        elif place in self.visited:
            target = place
        else:
            target = None  # not seen yet: explore
        return f"go {self.first_step(target)}"

    def first_step(self, target: str | None) -> str:
        """The first room on a shortest walk through known doors to ``target`` (a room
        seen as an exit counts as known), or to the nearest unvisited room when target
        is None or not yet known."""
        came_from: dict[str, str | None] = {self.room: None}
        queue = deque([self.room])
        while queue:
            room = queue.popleft()
            if room == target or (room not in self.visited and (target is None or target not in self.known())):
                while came_from[room] != self.room:
                    room = came_from[room]
                return room
            if room in self.visited:
                for nxt in sorted(self.exits[room]):
                    if nxt not in came_from:
                        came_from[nxt] = room
                        queue.append(nxt)
        raise RuntimeError("no known room left to explore")  # unreachable: the house is connected

    def known(self) -> set[str]:
        return self.visited | {nxt for room in self.visited for nxt in self.exits[room]}
