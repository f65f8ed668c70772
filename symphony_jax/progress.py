"""Progress bars for long runs (tqdm), or nothing."""

from __future__ import annotations


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int, show: bool, unit: str = "request"):
    """A tqdm bar over ``total`` items if ``show``, else one that ignores updates."""
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit=unit)
