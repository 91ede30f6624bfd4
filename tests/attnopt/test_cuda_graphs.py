"""CUDA graphs and static caches: an optimized model is captured and replayed like the original.

A captured graph replays the same kernels on new data, so nothing an attention call does may
copy from the host, synchronize, or draw a host-side random number while it is captured.
"""

from __future__ import annotations

import copy

import pytest
import torch

import attnopt

transformers = pytest.importorskip("transformers")


def _llama(**extra):
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attn_implementation="eager", **extra)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_op_seed_is_on_the_device_and_read_only_with_dropout():
    q, k, v = (torch.randn(1, 2, 8, 16, dtype=torch.float64) for _ in range(3))
    call = lambda p: torch.ops.attnopt.attention(  # noqa: E731
        q, k, v, None, None, None, None, None, 0.25, True, "top_left", None, None, None, p, "-inf", "reference")
    out, _, seed = call(0.0)
    assert seed.device == q.device and seed.dtype == torch.int64 and int(seed) == 0
    torch.manual_seed(3)
    dropped, _, seed_a = call(0.5)
    torch.manual_seed(3)
    again, _, seed_b = call(0.5)
    assert int(seed_a) != 0 and int(seed_a) == int(seed_b)
    torch.testing.assert_close(dropped, again)  # the seed drawn from torch's generator reproduces the mask
    assert not torch.allclose(dropped, out)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_gives_the_original_tokens(cache):
    """HF generate() with its default dynamic cache and with a static cache, left-padded batch."""
    model = _llama()
    optimized = attnopt.optimize(copy.deepcopy(model))
    ids = torch.randint(0, 128, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
               pad_token_id=0)
    if cache == "static":
        gen["cache_implementation"] = "static"
    with torch.no_grad():
        expected = model.generate(**gen)
        got = optimized.generate(**gen)
    assert torch.equal(got, expected)
    assert optimized.attnopt_report.sites and all(s.replaced for s in optimized.attnopt_report.sites), str(
        optimized.attnopt_report)


@pytest.mark.gpu
@pytest.mark.parametrize("padded", [False, True])
def test_torch_cuda_graph_captures_an_optimized_model(padded):
    """``torch.cuda.graph`` captures the optimized forward (warmed up first, as CUDA graphs need), and its
    replays on new inputs equal the original model's outputs.

    The original itself cannot be captured: HF's eager mask is made with ``torch.tensor(0.0, device=...)``,
    a host-to-device copy. In bfloat16 the rewrite reads that mask as key padding and erases its
    construction, so nothing of the kind is left (``use_cache=False``: the cache starts from host tensors).
    """
    model = _llama().to("cuda", torch.bfloat16)
    optimized = attnopt.optimize(copy.deepcopy(model))
    ids = torch.randint(0, 128, (2, 32), device="cuda")
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :9] = 0
    static = dict(input_ids=ids.clone(), attention_mask=mask.clone(), use_cache=False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(3):
            optimized(**static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        captured = optimized(**static).logits
    for _ in range(3):
        new_ids = torch.randint(0, 128, ids.shape, device="cuda")
        static["input_ids"].copy_(new_ids)
        graph.replay()
        with torch.no_grad():
            expected = model(input_ids=new_ids, attention_mask=mask, use_cache=False).logits
        real = mask.bool()[:, :, None].expand_as(expected)
        got, want = captured[real].float(), expected[real].float()
        assert ((got - want).norm() / want.norm()).item() < 2e-2  # bfloat16 rounding of another kernel


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["sdpa_efficient", "sdpa_cudnn", "triton_flash", "triton_decode"])
def test_a_capture_fills_rows_whatever_the_eager_calls_found(kernel):
    """Eager calls find that their padding leaves every row a key, and skip the fill. A CUDA graph captured
    afterwards on the same padding tensor must still fill on the device: a replay runs on whatever padding the
    tensor then holds. Here it hides every key of a batch row (written in place) and the replay's row is the
    uniform average of v, as the reference gives."""
    from attnopt.kernels import naive_attention
    from attnopt.kernels.spec import AttentionSpec, Fill

    torch.manual_seed(0)
    q_len = 1 if kernel == "triton_decode" else 64
    q = torch.randn(2, 4, q_len, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    keep = torch.ones(2, 64, dtype=torch.bool, device="cuda")
    keep[1, :20] = False

    def call():
        return attnopt.attention(q, k, v, key_padding_mask=keep, fill="finite_added", kernel=kernel)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        captured = call()
    keep[1] = False
    graph.replay()
    torch.cuda.synchronize()
    spec = AttentionSpec.from_tensors(q.double(), k.double(), v.double(), key_padding=keep, fill=Fill.FINITE_ADDED)
    want = naive_attention(q.double(), k.double(), v.double(), spec)
    torch.testing.assert_close(captured.double(), want, atol=2e-2, rtol=2e-2)


#: graph calls that copy from the host or read a value back: none may run while a CUDA graph is captured
_CAPTURE_BREAKERS = {torch.tensor, torch.as_tensor, "item", "tolist", "cpu", "numpy"}


def test_rewritten_hf_graph_has_nothing_a_capture_forbids(monkeypatch):
    """The property the CUDA-graph test needs, checked on any machine: after the rewrite, an HF Llama
    forward (bfloat16, ``use_cache=False``) makes no tensor from host data and reads nothing back (on CUDA,
    HF's eager mask is made with ``torch.tensor(0.0, device=...)``; the rewrite erases that mask)."""
    from attnopt import backend

    graphs = []
    original_optimize = backend.optimize_graph

    def keep(gm, *args, **kwargs):
        out = original_optimize(gm, *args, **kwargs)
        graphs.append([n.target for n in out.graph.nodes if n.op in ("call_function", "call_method")])
        return out

    monkeypatch.setattr(backend, "optimize_graph", keep)
    model = _llama().to(torch.bfloat16)
    optimized = attnopt.optimize(copy.deepcopy(model))
    ids = torch.randint(0, 128, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        optimized(input_ids=ids, attention_mask=mask, use_cache=False)
    assert graphs and all(s.replaced for s in optimized.attnopt_report.sites), str(optimized.attnopt_report)
    found = [target for target in graphs[-1] if target in _CAPTURE_BREAKERS]
    assert not found, found


def test_dropout_under_capture_is_refused_with_the_fix(monkeypatch):
    """Dropout draws its seed on the host each call: captured, every replay would repeat one mask. The op
    refuses and says what to do instead (checked here by pretending a capture is under way)."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    q = torch.randn(1, 2, 8, 16)
    call = lambda p: torch.ops.attnopt.attention(  # noqa: E731
        q, q, q, None, None, None, None, None, 0.25, True, "top_left", None, None, None, p, "-inf", "reference")
    with pytest.raises(RuntimeError, match=r"cannot be captured in a CUDA graph.*eval mode"):
        call(0.1)
    call(0.0)  # without dropout nothing is drawn: capture is fine


def test_generate_compiles_its_decode_step_with_attnopt():
    """generate() compiles the decode step itself for a static cache (on a GPU by default; here forced on the
    CPU): the optimized model's compile configuration carries attnopt's backend, so that compilation rewrites
    the attention too, and the tokens stay the original's."""
    model = _llama()
    optimized = attnopt.optimize(copy.deepcopy(model))
    config = optimized.generation_config.compile_config
    assert isinstance(config.backend, attnopt.Backend) and config.backend.report is optimized.attnopt_report
    assert config.backend.options.compiler == "inductor" and config.mode == "reduce-overhead"
    config._compile_all_devices = True  # transformers' switch to compile on the CPU too
    ids = torch.randint(0, 128, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
               pad_token_id=0, cache_implementation="static")
    with torch.no_grad():
        expected = model.generate(**gen)
        got = optimized.generate(**gen)
    assert torch.equal(got, expected)
    assert hasattr(optimized, "_compiled_call"), "generate() did not compile the decode step"
    decode = [s for s in optimized.attnopt_report.sites if s.q_len == 1]
    assert decode and all(s.replaced or s.reason for s in decode), str(optimized.attnopt_report)


def test_a_compile_backend_the_user_chose_is_kept():
    model = _llama()
    model.generation_config.compile_config = transformers.CompileConfig(backend="aot_eager")
    attnopt.optimize(model)
    assert model.generation_config.compile_config.backend == "aot_eager"


def test_a_static_cache_filled_by_an_optimized_prefill_keeps_its_static_addresses():
    """A static cache allocates and marks its tensors (``mark_static_address``) on its first update, unless
    dynamo is tracing it. In an optimized model that first update is traced, so attnopt marks them after the
    call, as the eager model does: without the marks the decode step ``generate()`` compiles with CUDA graphs
    finds the cache's in-place updates on non-static inputs and runs without graphs."""
    model = _llama()
    optimized = attnopt.optimize(copy.deepcopy(model))
    ids = torch.randint(0, 128, (2, 10))
    marks = {}
    for name, run in (("eager", model), ("optimized", optimized)):
        cache = transformers.StaticCache(config=model.config, max_cache_len=32)
        with torch.no_grad():
            run(input_ids=ids, past_key_values=cache, use_cache=True)
        marks[name] = [getattr(t, "_dynamo_static_input_type", None)
                       for layer in cache.layers for t in (layer.keys, layer.values, layer.cumulative_length)]
    assert marks["eager"] == ["unguarded"] * 6 and marks["optimized"] == marks["eager"]
    # a dynamic cache's tensors are reallocated every step: never marked
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        optimized(input_ids=ids, past_key_values=cache, use_cache=True)
    assert not any(hasattr(layer.keys, "_dynamo_static_input_type") for layer in cache.layers)
