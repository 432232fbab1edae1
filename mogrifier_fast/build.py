"""Build the C++ loops of backend ``"fused"`` ahead of time (for images and clusters), so that no
first forward waits for the compiler::

    python -m mogrifier_fast.build

One module holds every instruction-set variant of this architecture; it is cached under
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) for this torch version.
Exits 1, with the compiler's message, where the build fails.
"""

from __future__ import annotations

import sys

from mogrifier_fast.backends import fused_chain


def main() -> int:
    try:
        seconds = fused_chain.build()
    except Exception as error:  # the compiler's own message is the useful part
        print(f"mogrifier_fast.build: the C++ loops could not be built: {error}", file=sys.stderr)
        return 1
    done = "already built" if seconds is None else f"built in {seconds:.0f} s"
    runnable, compiled = fused_chain.runnable_isas(), fused_chain.compiled_isas()
    others = [name for name in compiled if name not in runnable]
    print(f"mogrifier_fast.build: C++ loops {done}; variants: {', '.join(compiled)}")
    print(f"  this CPU runs: {', '.join(runnable)} (default {runnable[0]})")
    if others:
        print(f"  not run here (this CPU lacks the instructions): {', '.join(others)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
