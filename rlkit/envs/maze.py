"""Maze (after LMRL-Gym's maze task): walk a grid to the goal, one move a turn.

Each turn the observation gives the position, the goal and the open directions, as
LMRL-Gym's fully observed maze does; walls are otherwise unseen, so a good policy
reads the open directions and remembers dead ends. Each instance is a random grid
(walls at ``wall_density``) with a start and goal joined by a path.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections import deque

from rlkit.envs.base import Environment, StepResult, register_environment

MOVES = {"north": (-1, 0), "south": (1, 0), "east": (0, 1), "west": (0, -1)}
MOVE_PATTERN = re.compile(r"\b(north|south|east|west)\b")


@register_environment("maze")
class MazeEnv(Environment):
    system_prompt = "Walk the maze to the goal. Reply with one move: north, south, east or west."

    @dataclasses.dataclass
    class Options(Environment.Options):
        size: int = 5  # the grid is size x size cells
        wall_density: float = 0.25  # share of cells that are walls
        min_distance: int = 3  # fewest moves from start to goal
        step_penalty: float = 0.0  # reward of each move that does not reach the goal is -step_penalty
        max_turns: int = 12

        def check(self) -> None:
            super().check()
            self.require(self.size >= 2, "size", "must be at least 2")
            self.require(0 <= self.wall_density <= 0.5, "wall_density", "must be in [0, 0.5]")
            self.require(
                1 <= self.min_distance <= 2 * (self.size - 1),
                "min_distance",
                f"must be in 1..{2 * (self.size - 1)} for size {self.size}",
            )
            self.require_non_negative("step_penalty")

    def generate_row(self, rng: random.Random) -> dict:
        n = self.options.size
        while True:
            walls = {(r, c) for r in range(n) for c in range(n) if rng.random() < self.options.wall_density}
            free = sorted({(r, c) for r in range(n) for c in range(n)} - walls)
            if len(free) < 2:
                continue
            start, goal = rng.sample(free, 2)
            grid = ["".join("#" if (r, c) in walls else "." for c in range(n)) for r in range(n)]
            path = shortest_path(grid, start, goal)
            if path is not None and len(path) >= self.options.min_distance:
                return {"grid": grid, "start": list(start), "goal": list(goal)}

    def reset(self, row: dict) -> str:
        self.grid = list(row["grid"])
        self.position = tuple(row["start"])
        self.goal = tuple(row["goal"])
        return self.describe()

    def describe(self) -> str:
        (r, c), (gr, gc) = self.position, self.goal
        return f"At ({r}, {c}). Goal ({gr}, {gc}). Open: {', '.join(open_moves(self.grid, self.position))}."

    def step(self, action: str) -> StepResult:
        match = MOVE_PATTERN.search(action.lower())
        if not match:
            return StepResult("Invalid move. " + self.describe(), self.move_reward, False, {"invalid_action": 1})
        if match.group(1) not in open_moves(self.grid, self.position):
            return StepResult("Blocked. " + self.describe(), self.move_reward, False)
        dr, dc = MOVES[match.group(1)]
        self.position = (self.position[0] + dr, self.position[1] + dc)
        if self.position == self.goal:
            return StepResult("You reached the goal!", 1.0, True)
        return StepResult(self.describe(), self.move_reward, False)

    @property
    def move_reward(self) -> float:
        return -self.options.step_penalty if self.options.step_penalty else 0.0

    def state_key(self) -> tuple[int, int]:
        return self.position

    def expert_action(self) -> str:
        return shortest_path(self.grid, self.position, self.goal)[0]


def open_moves(grid: list[str], position: tuple[int, int]) -> list[str]:
    """The moves from ``position`` that stay on the grid and off walls, in MOVES order."""
    n_rows, n_cols = len(grid), len(grid[0])
    moves = []
    for name, (dr, dc) in MOVES.items():
        r, c = position[0] + dr, position[1] + dc
        if 0 <= r < n_rows and 0 <= c < n_cols and grid[r][c] != "#":
            moves.append(name)
    return moves


def shortest_path(grid: list[str], start: tuple[int, int], goal: tuple[int, int]) -> list[str] | None:
    """The moves of a shortest path (breadth-first, ties broken in MOVES order); None if unreachable."""
    came_from: dict[tuple[int, int], tuple[tuple[int, int], str] | None] = {start: None}
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        if cell == goal:
            moves = []
            while came_from[cell] is not None:
                cell, move = came_from[cell]
                moves.append(move)
            return moves[::-1]
        for move in open_moves(grid, cell):
            dr, dc = MOVES[move]
            nxt = (cell[0] + dr, cell[1] + dc)
            if nxt not in came_from:
                came_from[nxt] = (cell, move)
                queue.append(nxt)
    return None
