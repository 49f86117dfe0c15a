"""Paging of the List RPCs: every listing returns at most a page of items, in a stable order,
and a token for the page after it.

Keyset paging: a page holds the items after the sort key of the previous page's last item, so
an item added or removed between two calls shifts no other item into a page twice or out of
every page. The token is that sort key, opaque to clients (base64 of its JSON); a token this
listing did not make is INVALID_ARGUMENT.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

T = TypeVar("T")
SortKey = tuple[str | int, ...]


@dataclass(frozen=True)
class Page:
    """Which page to read: `size` items after the one whose sort key is `after` (None: from
    the first item)."""

    size: int = DEFAULT_PAGE_SIZE
    after: SortKey | None = None

    @property
    def rows_to_read(self) -> int:
        """One row more than the page holds: it tells whether a next page exists."""
        return self.size + 1


class Paged(list[T]):
    """A page of items in order, and the sort key the next page starts after (None: this is the
    last page)."""

    def __init__(self, items: Iterable[T] = (), next_after: SortKey | None = None):
        super().__init__(items)
        self.next_after = next_after

    @property
    def next_page_token(self) -> str:
        if self.next_after is None:
            return ""
        return base64.urlsafe_b64encode(json.dumps(list(self.next_after)).encode()).decode()


@dataclass(frozen=True)
class Listing(Generic[T]):
    """How one listing pages: the sort key of an item (its store query orders by the same
    columns), and the types of the key's parts, which a token must hold."""

    sort_key: Callable[[T], SortKey]
    key_types: tuple[type, ...]

    def page(self, page_size: int, page_token: str) -> Page:
        """The page a request asks for (INVALID_ARGUMENT naming a bad size or token)."""
        if not 0 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument("page_size", f"must be 0 (default {DEFAULT_PAGE_SIZE}) to "
                                               f"{MAX_PAGE_SIZE} (got {page_size})")
        return Page(page_size or DEFAULT_PAGE_SIZE,
                    self._after(page_token) if page_token else None)

    def paged(self, rows: list[T], page: Page | None) -> Paged[T]:
        """The page in `rows`: what a query read after `page.after`, `page.rows_to_read` at
        most (`page` None: it read every row, one last page)."""
        if page is None or len(rows) <= page.size:
            return Paged(rows)
        return Paged(rows[:page.size], self.sort_key(rows[page.size - 1]))

    def _after(self, token: str) -> SortKey:
        try:
            values = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
        except (UnicodeError, binascii.Error, ValueError):
            values = None
        if (not isinstance(values, list) or len(values) != len(self.key_types)
                or any(type(v) is not t for v, t in zip(values, self.key_types, strict=True))):
            raise InvalidArgument("page_token", "not a next_page_token of this listing")
        return tuple(values)
