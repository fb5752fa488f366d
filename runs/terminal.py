"""The terminal under a progress bar."""

from __future__ import annotations

__all__ = ["end_progress_bar_lines"]


def end_progress_bar_lines() -> None:
    """End the line of every progress bar still on screen, so that an error message starts on a fresh line.

    tqdm (Lightning's default bar) leaves the cursor at the end of the bar's line; a bar the error interrupted is
    still open (in ``tqdm._instances``).
    """
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        if not bar.disable and bar.fp is not None:
            bar.fp.write("\n")
            bar.fp.flush()
