"""Synthetic sources in the four Hub datasets' schemas, of the demo's lengths, at any size and byte-for-byte the same
for the same seed: the scaling benchmark's input, and the corpus whose mix and pack outputs a test pins.

friction rows (disagreement, overthinking): a question of ~30 words, five agents' thought streams of ~45 words, an
answer of ~100 words (the demo's ~2.1k characters). reluctance rows: a ChatML conversation in `text` with a
<judging> block (~1.3k characters). With `dirty`, about one row in 50 is one the original's data had or a user's
file might: a generator error, a duplicate of an earlier row, a line that is not JSON, an empty field.
"""

from __future__ import annotations

import json
import os
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

WORDS = [
    "I",
    "you",
    "they",
    "we",
    "it",
    "this",
    "that",
    "the",
    "a",
    "an",
    "and",
    "but",
    "or",
    "so",
    "because",
    "if",
    "when",
    "then",
    "maybe",
    "perhaps",
    "not",
    "sure",
    "wonder",
    "could",
    "might",
    "should",
    "would",
    "feel",
    "think",
    "know",
    "want",
    "need",
    "keep",
    "thinking",
    "wait",
    "hm",
    "okay",
    "actually",
    "honestly",
    "really",
    "just",
    "still",
    "again",
    "never",
    "always",
    "sometimes",
    "friend",
    "sister",
    "brother",
    "mother",
    "father",
    "partner",
    "boss",
    "coworker",
    "job",
    "work",
    "home",
    "money",
    "time",
    "week",
    "month",
    "year",
    "night",
    "morning",
    "plan",
    "idea",
    "question",
    "answer",
    "reason",
    "problem",
    "choice",
    "change",
    "move",
    "leave",
    "stay",
    "quit",
    "call",
    "text",
    "message",
    "talk",
    "listen",
    "tell",
    "ask",
    "help",
    "hurt",
    "care",
    "worry",
    "fear",
    "hope",
    "anger",
    "tired",
    "scared",
    "angry",
    "sad",
    "happy",
    "fine",
    "heavy",
    "hard",
    "easy",
    "fair",
    "wrong",
    "right",
    "true",
    "false",
    "better",
    "worse",
    "more",
    "less",
    "enough",
    "too",
    "much",
    "little",
    "big",
    "small",
    "new",
    "old",
    "first",
    "last",
    "next",
    "other",
    "same",
    "different",
    "whole",
    "part",
    "middle",
    "side",
    "way",
    "place",
    "thing",
    "person",
    "people",
    "life",
    "story",
    "memory",
    "moment",
    "pattern",
    "habit",
    "promise",
    "decision",
    "conversation",
    "boundary",
    "trust",
    "doubt",
    "risk",
    "cost",
    "miss",
    "lose",
    "find",
    "see",
    "hear",
    "say",
    "feel",
    "go",
    "come",
    "take",
    "give",
    "make",
    "let",
    "try",
    "stop",
    "start",
    "end",
    "over",
    "under",
    "about",
    "around",
    "through",
    "between",
    "without",
    "within",
    "here",
    "there",
    "now",
    "later",
    "soon",
    "yet",
    "already",
    "almost",
    "only",
    "even",
    "also",
    "however",
    "though",
    "although",
    "unless",
    "until",
    "while",
    "since",
]
AGENTS = ["problem_framer", "memory_activator", "mechanism_explorer", "perspective_generator", "synthesizer"]
SOURCES = {
    "disagreement": "friction",
    "overthinking": "friction",
    "reluctance_v61": "reluctance",
    "reluctance_v53": "reluctance",
}
RELUCTANCE_SYSTEM = "You are a careful, warm assistant. You may hesitate when going along quickly could hurt."


def sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(max(1, words)))
    return text[0].upper() + text[1:] + rng.choice([".", "...", "?", "."])


def friction_row(rng: random.Random, row_id: str) -> dict:
    return {
        "id": row_id,
        "question": sentence(rng, rng.randint(22, 38)),
        "agent_responses": [
            {"agent_type": agent, "thought_stream": sentence(rng, rng.randint(35, 55)), "friction_moments": []}
            for agent in AGENTS
        ],
        "final_answer": sentence(rng, rng.randint(80, 120)),
        "metadata": {"timestamp": "2025-02-14 10:00:00", "model": "synthetic"},
    }


def reluctance_row(rng: random.Random) -> dict:
    return {
        "text": f"<|im_start|>system\n{RELUCTANCE_SYSTEM}\n<|im_end|>\n"
        f"<|im_start|>user\n{sentence(rng, rng.randint(18, 30))}\n<|im_end|>\n"
        f"<|im_start|>assistant\n<judging>\n{sentence(rng, rng.randint(45, 70))}\n</judging>\n"
        f"{sentence(rng, rng.randint(80, 110))}\n<|im_end|>\n"
    }


def dirty_line(rng: random.Random, source_format: str, earlier: list[str]) -> str:
    kind = rng.choice(["generator_error", "duplicate", "invalid_json", "empty_field"])
    if kind == "duplicate" and earlier:
        return rng.choice(earlier)
    if kind == "invalid_json":
        return '{"question": "cut off'
    if source_format == "friction":
        row = friction_row(rng, f"dirty-{rng.random()}")
        row["final_answer"] = "Error: rate limit" if kind == "generator_error" else " "
    else:
        row = reluctance_row(rng)
        if kind == "empty_field":
            row["text"] = ""
        elif kind == "generator_error":
            row["text"] = row["text"].replace("</judging>\n", "</judging>\nError: upstream timeout ", 1)
    return json.dumps(row, ensure_ascii=False)


def write_source(path: Path, name: str, source_format: str, rows: int, seed: int, dirty: bool) -> None:
    rng = random.Random(seed)
    earlier: list[str] = []
    with path.open("w", encoding="utf-8") as handle:
        for index in range(rows):
            if dirty and rng.random() < 0.02:
                line = dirty_line(rng, source_format, earlier)
            else:
                row = friction_row(rng, f"{name}-{index}") if source_format == "friction" else reluctance_row(rng)
                line = json.dumps(row, ensure_ascii=False)
                if len(earlier) < 100:
                    earlier.append(line)
            handle.write(line + "\n")


def write_sources(out_dir: Path, examples: int, seed: int = 0, dirty: bool = False) -> dict[str, Path]:
    """`examples` rows in all, shared out evenly over the four sources, as JSON Lines files in `out_dir`; each source
    from a generator of its own, so they are written in parallel, one process per core."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / f"{name}.jsonl" for name in SOURCES}
    with ProcessPoolExecutor(min(len(SOURCES), os.cpu_count() or 1)) as pool:
        written = [
            pool.submit(
                write_source,
                paths[name],
                name,
                source_format,
                examples // len(SOURCES) + (position < examples % len(SOURCES)),
                seed * 100 + position,
                dirty,
            )
            for position, (name, source_format) in enumerate(SOURCES.items())
        ]
        for future in written:
            future.result()
    return paths
