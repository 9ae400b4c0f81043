"""Math answers checked with math-verify: the last \\boxed{} answer, else the final
line's answer; equivalent forms (1/2, \\frac12, 0.5) count as equal."""

from __future__ import annotations

import logging
import threading

from math_verify import parse, verify


# Off the main thread (Ray Data UDFs) math-verify cannot time out and says so on every call.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def _timeout() -> int | None:
    # math-verify times out with signals, which only work in the main thread.
    return 5 if threading.current_thread() is threading.main_thread() else None


def extract_answer(text: str) -> list:
    """Parsed answer candidates (empty when the response states no answer)."""
    if not text or not text.strip():
        return []
    if "\\boxed" in text:
        return parse(text, parsing_timeout=_timeout())
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return parse(lines[-1], parsing_timeout=_timeout())


# Off the main thread a pathological answer (a tower of exponents) could hang sympy without a limit: the
# check then runs in a one-process pool whose worker runs it on its main thread (math-verify's own 5 s
# timeouts work there), with an outer limit that kills the worker.
OUTER_TIMEOUT_S = 30.0
_pool = None
_pool_lock = threading.Lock()
log = logging.getLogger(__name__)


def run_with_timeout(fn, args: tuple, timeout: float):
    """fn(*args) in the pool's worker process; TimeoutError after `timeout` s (the worker is killed)."""
    import concurrent.futures
    import multiprocessing

    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        pool = _pool
    fut = pool.submit(fn, *args)
    try:
        return fut.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        with _pool_lock:
            if _pool is pool:
                _pool = None
        for p in list(getattr(pool, "_processes", {}).values()):  # a hung check: the worker is killed
            p.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise TimeoutError(f"{getattr(fn, '__name__', fn)} took longer than {timeout:g} s") from None


def is_correct(response: str, reference: str) -> bool:
    """The response's final answer equals the reference. A check that exceeds its time limit is wrong (False),
    with a warning."""
    if threading.current_thread() is threading.main_thread():
        return _is_correct(response, reference)
    try:
        return run_with_timeout(_is_correct, (response, reference), OUTER_TIMEOUT_S)
    except TimeoutError as e:
        log.warning("math verifier: %s on a response of %d characters; scored as wrong", e, len(response))
        return False


def _is_correct(response: str, reference: str) -> bool:
    pred = extract_answer(response)
    if not pred:
        return False
    gold = parse(f"${reference}$", parsing_timeout=_timeout()) or parse(reference, parsing_timeout=_timeout())
    return bool(gold) and verify(gold, pred, timeout_seconds=_timeout())


def needs_reference(spec: dict) -> bool:
    """An objective spec verified against each problem's reference answer (the built-in `math` verifier):
    the stages fail a problem without one on its own, before it can fail the batch it is in."""
    return spec.get("kind") == "verifiable" and spec.get("verifier") == "math"


def math_accuracy(prompt, response, reference, meta) -> float:
    """Verifier signature shared by every objective: 1.0 if the final answer is right, else 0.0."""
    if reference is None:
        raise ValueError("math accuracy needs a reference answer")
    text = response if isinstance(response, str) else (response[-1]["content"] if response else "")
    return 1.0 if is_correct(text, reference) else 0.0
