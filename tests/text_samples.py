"""Random test strings for tokenizer comparisons (shared by the tokenizer tests)."""
from __future__ import annotations

import random

SPACES = " \n\t\r\x0b\x0c\x85\xa0\u1680\u2000\u200a\u2028\u2029\u202f\u205f\u3000\u200b\ufeff\u2581"


def random_texts(seed: int, n: int, words: list[str], p_ascii: float = 0.5, p_word: float = 0.15,
                 max_len: int = 30) -> list[str]:
    """n seeded strings mixing ASCII, whitespace of all kinds, code points from every plane and `words`."""
    rng = random.Random(seed)

    def char() -> str:
        r = rng.random()
        if r < p_ascii:
            return chr(rng.randint(0x20, 0x7E))
        if r < 0.65:
            return rng.choice(SPACES)
        if r < 0.85:
            return chr(rng.randint(0x80, 0x2FFF))
        while True:
            c = rng.randint(0x3000, 0x10FFFF)
            if not 0xD800 <= c <= 0xDFFF:
                return chr(c)

    return ["".join(rng.choice(words) if rng.random() < p_word else char() for _ in range(rng.randint(0, max_len)))
            for _ in range(n)]
