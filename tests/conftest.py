import os
import resource
import time

import pytest
import torch

# At most 2 threads, and no more than OMP_NUM_THREADS when it is set: on a shared, busy machine
# a second spinning thread per process slows small models down several times.
_threads = max(1, min(2, os.cpu_count() or 1))
if os.environ.get("OMP_NUM_THREADS", "").isdigit():
    _threads = max(1, min(_threads, int(os.environ["OMP_NUM_THREADS"])))
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = 1  # the test processes already use the cores
torch.set_num_threads(_threads)

#: The slowest tests (seconds on the idle 2-core machine under ``-n 2``), longest first. They
#: start first, and ``--maxschedchunk 2`` (pyproject addopts) hands the workers 2 tests at a
#: time, so the two workers take tests longest-first from one queue and finish together
#: instead of one of them running a long test alone at the end. Ids are prefixes: a file, a
#: test, or a test with its parameters.
LONG_FIRST = (
    "tests/test_flower.py",  # ~250
    "tests/test_ddp.py::test_two_gloo_processes_give_the_results_of_one",  # 76
    "tests/test_feel.py::test_fresh_process_writes_only_under_its_run_folders",  # ~20
    "tests/test_reliability.py::test_sigterm_mid_round_then_resume_is_bit_identical",  # 20
    "tests/test_grid.py::test_tiny_grid_runs_skips_and_tabulates",  # ~15 (one cell process)
    "tests/test_batched_compile.py::test_the_whole_local_step_compiles_once",  # 12
    "tests/test_gpu_suite.py::test_gpu_suite_smoke_on_cpu",  # 12
    "tests/test_callbacks.py::test_cli_run_on_digits_logs_the_analyses",  # 11
    "tests/test_reliability.py::test_resume_from_a_periodic_checkpoint_mid_run",  # 3-10 each
    "tests/test_partition.py::test_reference_lda_alpha_005_cifar_shaped",  # 10
    "tests/test_least_squares.py::test_several_local_steps_bias_fedavg",  # 10
    "tests/test_batched_configs.py",  # 5-9 each
    "tests/test_systems_cli.py::test_resume_with_top_k_error_feedback",  # 7
    "tests/test_cli.py::test_same_seed_same_metrics_and_algorithm_swap",  # 6
    "tests/test_data_cli.py::test_two_rounds_through_the_cli",  # 3-6 each
)


def pytest_collection_modifyitems(config, items):
    """Long tests first (see ``LONG_FIRST``); every other test keeps its place in the order."""

    def rank(item) -> int:
        for i, prefix in enumerate(LONG_FIRST):
            if item.nodeid.startswith(prefix):
                return i
        return len(LONG_FIRST)

    items.sort(key=rank)  # stable


@pytest.fixture(autouse=True)
def _flush_denormal_off():
    """Every test starts with PyTorch's default, denormals kept: a benchmark's ``main()`` run
    in process (tests/test_gpu_suite.py) turns flush-to-zero on for the whole process, which
    would otherwise change the arithmetic of every later test on that worker."""
    torch.set_flush_denormal(False)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With ``FL_TEST_CPU=<prefix>`` set, append one line per test to ``<prefix>.<worker>``:
    node id, CPU seconds of this process, CPU seconds of the child processes it waited for
    (a test's subprocesses), wall seconds, tab-separated. On a shared machine the CPU time is
    the figure to compare; the wall time grows with the load."""
    out = os.environ.get("FL_TEST_CPU")
    if not out:
        yield
        return
    own, children, wall = time.process_time(), _children_cpu(), time.perf_counter()
    yield
    line = (f"{item.nodeid}\t{time.process_time() - own:.2f}\t{_children_cpu() - children:.2f}"
            f"\t{time.perf_counter() - wall:.2f}\n")
    with open(f"{out}.{os.environ.get('PYTEST_XDIST_WORKER', 'main')}", "a") as fh:
        fh.write(line)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
