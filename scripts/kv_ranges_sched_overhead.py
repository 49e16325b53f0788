"""Scheduler-side cost of G range groups: allocate_slots for one decode step of 16 running requests
(vLLM's KVCacheManager, no engine); median of 9 repeats of 50 steps."""
import statistics, sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import tests.unit.engine.test_kv_range_manager as t
t.POOL = 40001
for g in (1, 2, 3, 5, 6, 10, 15):
    for k in (0, 15):
        if g == 1 and k:
            continue
        if g == 1:
            t.kv_range_manager.install = lambda m, f, num_ranges: []  # plain vLLM: one group, no range managers
        else:
            import importlib; importlib.reload(t.kv_range_manager)
        e = t.Engine(g)
        reqs = [e.request(f"r{i}", 100, split_layer=k, first_token=1000 * i + 1) for i in range(16)]
        for r in reqs:
            e.admit(r)
        samples = []
        for _ in range(9):
            t0 = time.perf_counter()
            for _ in range(50):
                for r in reqs:
                    r.append_output_token_ids(7)
                    assert e.manager.allocate_slots(r, 1) is not None
                    r.num_computed_tokens = r.num_tokens
            samples.append((time.perf_counter() - t0) / 50)
        print(f"G={g:2d} k={k:2d}: median {statistics.median(samples)*1e6:6.0f} us, min {min(samples)*1e6:6.0f} us per step", flush=True)
