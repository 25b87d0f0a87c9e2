"""Where a credential could be printed, and a search of all of it for any piece of one.

`exposed(exc)` gathers what an error shows anywhere it is reported: its str and repr, its
attributes and notes, the same for every exception chained to it (cause, context, an
ExceptionGroup's members), the formatted traceback, and every frame's locals in every one of those
tracebacks as error trackers record them (``repr`` of each, and
``TracebackException(capture_locals=True)``, as Sentry, rich, pytest --showlocals and structlog
do). An exception held as a frame's local is walked the same way (its own traceback is one a
tracker can reach). `leaks(texts, secrets)` finds every piece of `size` characters of any secret.
"""

from __future__ import annotations

import contextlib
import json
import logging
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

from asyncpool import Target
from asyncpool.credentials.iam import IamAuth

_TESTS_DIR = str(Path(__file__).parent)


def forms(secret: str) -> set[str]:
    """`secret` as any output could write it: raw, percent-encoded, JSON- or repr-escaped."""
    return {
        secret,
        quote(secret, safe="", errors="surrogatepass"),  # (a lone surrogate: PGPASSWORD's bytes)
        quote(secret, errors="surrogatepass"),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        repr(secret)[1:-1],
        secret.encode("unicode_escape").decode("ascii"),
    }


def pieces(secret: str, size: int) -> set[str]:
    """Every `size`-character piece of every form of `secret` (the whole of a shorter one)."""
    found = set()
    for form in forms(secret):
        if len(form) <= size:
            found.add(form)
        found.update(form[i:i + size] for i in range(len(form) - size + 1))
    return found


def leaks(texts: Iterable[tuple[str, str]], secrets: Iterable[str], size: int = 8) -> list[str]:
    """``where: piece`` for each (where, text) holding a `size`-character piece of a secret."""
    wanted = {p for s in secrets if s for p in pieces(s, size)}
    found = []
    for where, text in texts:
        hit = next((p for p in wanted if p in text), None)
        if hit is not None:
            at = text.index(hit)
            found.append(f"{where}: ...{_masked(text, wanted)[max(0, at - 60):at + 60]}...")
    return found


def _masked(text: str, wanted: set[str]) -> str:
    """`text` with every character of every piece in it as ``*``: the report must not leak."""
    hidden = [False] * len(text)
    for piece in wanted:
        at = text.find(piece)
        while at != -1:
            hidden[at:at + len(piece)] = [True] * len(piece)
            at = text.find(piece, at + 1)
    return "".join("*" if h else c for c, h in zip(text, hidden, strict=True))


def _safe(show: object) -> str:
    try:
        return repr(show)
    except Exception as exc:  # a broken repr prints nothing, which leaks nothing
        return f"<repr failed: {type(exc).__name__}>"


def _tracebacks(tb: TracebackType | None) -> Iterator[TracebackType]:
    while tb is not None:
        yield tb
        tb = tb.tb_next


def _linked(exc: BaseException) -> list[BaseException]:
    linked = [e for e in (exc.__cause__, exc.__context__) if e is not None]
    if isinstance(exc, BaseExceptionGroup):
        linked += list(exc.exceptions)
    return linked


def exposed(exc: BaseException, skip_dir: str = _TESTS_DIR) -> list[tuple[str, str]]:
    """Every (where, text) that reporting `exc` can print; frames of code under `skip_dir` (the
    test, which holds the secret on purpose) are left out."""
    texts: list[tuple[str, str]] = []
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        name = type(e).__qualname__
        texts += [(f"{name} str", str(e)), (f"{name} repr", _safe(e)),
                  (f"{name} attributes", _safe(vars(e)) if hasattr(e, "__dict__") else ""),
                  (f"{name} notes", _safe(getattr(e, "__notes__", None)))]
        texts.append((f"{name} traceback", "".join(traceback.format_exception(e))))
        todo += _linked(e)
        kept = [tb for tb in _tracebacks(e.__traceback__)
                if not tb.tb_frame.f_code.co_filename.startswith(skip_dir)]
        for tb in kept:
            frame = tb.tb_frame
            where = f"{name} frame {frame.f_code.co_qualname}"
            for local, value in frame.f_locals.items():
                texts.append((f"{where} local {local}", _safe(value)))
                if isinstance(value, BaseException):
                    todo.append(value)
        if kept:
            formatted = traceback.TracebackException(
                type(e), e, kept[0], capture_locals=True).format(chain=False)
            texts.append((f"{name} traceback with locals", "".join(formatted)))
    return texts


class RecordingIamAuth(IamAuth):
    """IamAuth that keeps the tokens it made, to look for them in the outputs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tokens: list[str] = []

    async def password(self, target: Target) -> str:
        token = await super().password(target)
        self.tokens.append(token)
        return token


@contextlib.contextmanager
def logging_to(handler: logging.Handler) -> Iterator[None]:
    """Every log record, DEBUG included, to `handler` (on the root logger) while in the block."""
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
