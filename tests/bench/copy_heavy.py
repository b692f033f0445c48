"""The copy-heavy workload of speculative decoding (issue 20): a ~400-token Python module
given in the prompt, to be written out again with one rename, and a free-text request,
as chat messages; shared by the speculation tests and ``tests/bench/speculation.py``."""

from __future__ import annotations

MODULE = '''\
"""A small inventory of items with prices and quantities."""

from dataclasses import dataclass


@dataclass
class Item:
    name: str
    price: float
    quantity: int

    def total(self) -> float:
        return self.price * self.quantity


class Inventory:
    def __init__(self) -> None:
        self.items: dict[str, Item] = {}

    def add(self, name: str, price: float, quantity: int = 1) -> None:
        if name in self.items:
            self.items[name].quantity += quantity
        else:
            self.items[name] = Item(name, price, quantity)

    def remove(self, name: str, quantity: int = 1) -> None:
        item = self.items[name]
        item.quantity -= quantity
        if item.quantity <= 0:
            del self.items[name]

    def value(self) -> float:
        return sum(item.total() for item in self.items.values())

    def cheapest(self) -> Item | None:
        if not self.items:
            return None
        return min(self.items.values(), key=lambda item: item.price)

    def report(self) -> str:
        lines = []
        for item in sorted(self.items.values(), key=lambda item: item.name):
            lines.append(f"{item.name}: {item.quantity} x {item.price:.2f}")
        lines.append(f"total: {self.value():.2f}")
        return "\\n".join(lines)
'''

COPY_REQUEST = (
    "Rewrite this Python module, renaming the class Inventory to Stock. Reply with the "
    "whole module in one code block.\n\n```python\n" + MODULE + "```"
)
FREE_REQUEST = "Write a short story about a lighthouse keeper."


def gemma3_turn(content: str) -> str:
    """A one-turn Gemma 3 prompt for ``content``, BOS included (for engine-level tests)."""
    return f"<bos><start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n"
