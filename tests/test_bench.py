"""bench.py's rollout comparison at a small size: the KV-cache engine and the naive baseline (re-encode, then
model.generate, every turn) write the same tokens, so its speed ratio compares equal work."""
import bench


def test_engine_and_baseline_write_the_same_tokens():
    # the shipped base, not bench.py's default random weights: those attend almost uniformly, so a fault in positions
    # or the cache barely moves their argmax (a decode position off by one went unseen with them, not with the base)
    model, processor = bench.load("tiny", None, "cpu")
    # 1 prompt x group 2: in each turn 2 tokens of the model's own (greedy; the base would close its turn itself after
    # a few more), then a scripted Crop call that returns an image; the answer after the second call; no warm-up
    # runs, since only the tokens are checked
    r = bench.time_rollout(model, processor, bench.bench_examples(1), group=2, turns=2, free=2, warm_up=False)
    assert r["trajectories"] == 2 and r["tool_calls"] == 4 and r["image_observations"] == 4, r
    assert r["finish_reasons"] == ["response"]
    assert r["identical_tokens"] is True
    # the engine's own timings name every phase it spent time in (vision is the bench's own hook, part of prefill)
    assert {"prefill", "decode"} <= set(r["engine_split_s"]) and r["engine_split_s"]["vision"] > 0


def test_kernel_seconds_counts_the_arithmetic_kernels_and_nothing_else():
    # the floor that bench.py's zero_overhead_speedup divides by: a torch release that renamed a kernel would
    # silently drop it from ARITHMETIC and raise the reported ceiling
    import torch
    import torch.nn.functional as F
    a, x = torch.randn(256, 256), torch.randn(2, 6, 300, 32)
    assert bench.kernel_seconds(lambda: a @ a) > 0  # aten::mm
    assert bench.kernel_seconds(lambda: F.linear(a, a, a[0])) > 0  # aten::addmm
    assert bench.kernel_seconds(lambda: F.scaled_dot_product_attention(x, x, x, is_causal=True)) > 0  # fused kernel
    conv = torch.nn.Conv3d(3, 8, kernel_size=(2, 14, 14), stride=(2, 14, 14))  # the vision tower's patch embedding
    assert bench.kernel_seconds(lambda: conv(torch.randn(4, 3, 2, 14, 14))) > 0
    assert bench.kernel_seconds(lambda: (a + 1).relu().sum()) == 0  # element-wise work is overhead, not arithmetic
