"""Learned priors in a batch's journal (issue 22): load them when a batch starts, store them
when it ends. A journal that keeps priors has ``load_priors`` / ``save_priors`` (``PriorStore``,
which ``SqliteJournal`` implements); any other ``Journal`` works as before, without them. A
store that fails is logged and passed over: priors only save requests."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from ._errors import JournalError
from ._priors import KindPrior, Priors

__all__ = ["PriorStore", "load_priors", "save_priors"]

logger = logging.getLogger("apimart_async")


@runtime_checkable
class PriorStore(Protocol):
    """A journal that keeps learned priors by kind."""

    async def load_priors(self) -> dict[str, KindPrior]:
        """Every kind's prior stored (empty for a new journal)."""
        ...

    async def save_priors(self, priors: Mapping[str, KindPrior]) -> None:
        """Store these kinds' priors (replacing what was stored for them)."""
        ...


async def load_priors(journal: object, priors: Priors) -> None:
    """Merge what ``journal`` keeps into ``priors`` (nothing if it keeps none)."""
    if not isinstance(journal, PriorStore):
        return
    try:
        priors.merge(await journal.load_priors())
    except JournalError as exc:
        logger.warning("learned poll priors not loaded from the journal: %s", exc)


async def save_priors(journal: object, priors: Priors) -> None:
    """Store ``priors`` in ``journal`` (if it keeps them)."""
    if not isinstance(journal, PriorStore) or not len(priors):
        return
    try:
        await journal.save_priors(priors.export())
    except JournalError as exc:
        logger.warning("learned poll priors not stored in the journal: %s", exc)
