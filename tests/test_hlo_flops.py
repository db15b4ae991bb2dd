"""hlo_flops.matmul_flops: a compiled program's matmul FLOPs with loops counted by their
trip counts (XLA's cost_analysis counts a while body once), on CPU and on libtpu's
compile-only v5e devices, plus hand-written HLO that pins the parser."""
import functools

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from esspr_jax.hlo_flops import matmul_flops

M = N = K = 256
LAYERS = 10


def _scan(x, w):
  return lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0].sum()


def _compiled(fn, *args):
  return jax.jit(fn).lower(*args).compile()


@functools.cache
def _tpu_mesh():
  from jax.experimental import topologies  # noqa: PLC0415  (loads libtpu)
  devs = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
  return jax.make_mesh((4,), ("x",), devices=devs, axis_types=(jax.sharding.AxisType.Auto,))


def _tpu_args(x_spec):
  mesh = _tpu_mesh()
  return (jax.ShapeDtypeStruct((M, K), jnp.float32, sharding=NamedSharding(mesh, x_spec)),
          jax.ShapeDtypeStruct((LAYERS, K, N), jnp.float32, sharding=NamedSharding(mesh, P())))


def test_scan_on_cpu_counts_every_iteration():
  compiled = _compiled(_scan, jnp.ones((M, K)), jnp.ones((LAYERS, K, N)))
  assert matmul_flops(compiled.as_text()) == LAYERS * 2 * M * N * K
  # What this module is for: XLA counts the body once.
  assert compiled.cost_analysis()["flops"] < 0.2 * LAYERS * 2 * M * N * K


@pytest.mark.parametrize("x_spec,rows", [(P(), M), (P("x"), M // 4)])
def test_scan_on_tpu_counts_one_devices_share(x_spec, rows):
  compiled = _compiled(_scan, *_tpu_args(x_spec))
  assert matmul_flops(compiled.as_text()) == LAYERS * 2 * rows * N * K


def test_scan_gradient_is_three_forwards_on_cpu_and_tpu():
  forward = LAYERS * 2 * M * N * K
  grad = jax.grad(_scan, argnums=(0, 1))
  cpu = _compiled(grad, jnp.ones((M, K)), jnp.ones((LAYERS, K, N)))
  assert matmul_flops(cpu.as_text()) == 3 * forward
  tpu = _compiled(grad, *_tpu_args(P()))
  assert matmul_flops(tpu.as_text()) == 3 * forward


def test_nested_scans_multiply():
  def nested(x, w):  # w: [outer, inner, d, d]
    def outer(c, wo):
      return lax.scan(lambda ci, wi: (jnp.tanh(ci @ wi), None), c, wo)[0], None
    return lax.scan(outer, x, w)[0].sum()
  d = 64
  compiled = _compiled(nested, jnp.ones((d, d)), jnp.ones((3, 4, d, d)))
  assert matmul_flops(compiled.as_text()) == 3 * 4 * 2 * d ** 3


def test_remat_inside_a_scan_counts_the_recomputation():
  def body(c, wi):
    return jnp.tanh(c @ wi), None
  def remat_scan(x, w):
    return lax.scan(jax.checkpoint(body), x, w)[0].sum()
  d = 64
  compiled = _compiled(jax.grad(remat_scan, argnums=(0, 1)), jnp.ones((d, d)),
                       jnp.ones((LAYERS, d, d)))
  # forward, its recomputation in the backward loop, and the backward's two matmuls.
  assert matmul_flops(compiled.as_text()) == 4 * LAYERS * 2 * d ** 3


def test_without_loops_an_mlp_matches_cost_analysis():
  def mlp(x, w1, w2):
    return (jax.nn.gelu(x @ w1) @ w2).sum()
  args = (jnp.ones((128, 256)), jnp.ones((256, 512)), jnp.ones((512, 256)))
  for fn in (mlp, jax.grad(mlp, argnums=(1, 2))):
    compiled = _compiled(fn, *args)
    ours, xla = matmul_flops(compiled.as_text()), compiled.cost_analysis()["flops"]
    assert ours == pytest.approx(xla, rel=0.02)


def test_without_loops_a_conv_layer_matches_cost_analysis():
  def conv(x, w, stride):
    y = lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(y).sum()
  x, w = jnp.ones((4, 16, 16, 8)), jnp.ones((3, 3, 8, 16))
  for stride in (1, 2):
    forward = functools.partial(conv, stride=stride)
    # The weight gradient is a 16x16-window convolution over padded input: only the taps
    # that read real input count, as in XLA's count.
    for fn in (forward, jax.grad(forward, argnums=(0, 1))):
      compiled = _compiled(fn, x, w)
      ours, xla = matmul_flops(compiled.as_text()), compiled.cost_analysis()["flops"]
      assert ours == pytest.approx(xla, rel=0.02)
  compiled = _compiled(functools.partial(conv, stride=1), x, w)
  assert matmul_flops(compiled.as_text()) == 2 * 4 * 16 * 16 * 16 * 8 * 46 * 46 / 16 ** 2


def test_a_data_dependent_while_loop_is_unknown():
  def loop(x, w, n):
    return lax.while_loop(lambda s: s[0] < n, lambda s: (s[0] + 1, jnp.tanh(s[1] @ w)),
                          (0, x))[1].sum()
  compiled = _compiled(loop, jnp.ones((64, 64)), jnp.ones((64, 64)), 5)
  assert matmul_flops(compiled.as_text()) is None


# --- hand-written HLO -------------------------------------------------------------------

_FUSED_DOT = """\
HloModule m, entry_computation_layout={(f32[8,32]{1,0}, bf16[32,16]{1,0})->f32[8,16]{1,0}}

%fused_computation (param_0.1: f32[8,32], param_1.2: bf16[32,16]) -> f32[8,16] {
  %param_0.1 = f32[8,32]{1,0:T(8,128)S(1)} parameter(0)
  %param_1.2 = bf16[32,16]{1,0:T(8,128)(2,1)S(1)} parameter(1)
  %convert.1 = f32[32,16]{1,0:T(8,128)} convert(%param_1.2), metadata={op_name="a(b)"}
  ROOT %dot.3 = f32[8,16]{1,0:T(8,128)} dot(%param_0.1, %convert.1), lhs_contracting_dims={1},\
 rhs_contracting_dims={0}, metadata={op_name="jit(f)/dot_general calls=%nothing"}
}

ENTRY %main (x: f32[8,32], w: bf16[32,16]) -> f32[8,16] {
  %x = f32[8,32]{1,0} parameter(0), metadata={op_name="x"}
  %w = bf16[32,16]{1,0} parameter(1)
  ROOT %fusion = f32[8,16]{1,0:T(8,128)} fusion(%x, %w), kind=kOutput, calls=%fused_computation
}
"""


def test_hlo_a_fusion_calling_a_dot():
  assert matmul_flops(_FUSED_DOT) == 2 * 8 * 16 * 32


_LOOP = """\
HloModule m

%body (p: (s32[], f32[4,6,8], /*index=2*/f32[8,8], s32[])) -> (s32[], f32[4,6,8], f32[8,8], s32[]) {
  %p = (s32[]{:T(128)}, f32[4,6,8]{2,1,0:T(8,128)}, /*index=2*/f32[8,8]{1,0},\
 s32[]{:T(128)}) parameter(0)
  %gte.0 = s32[]{:T(128)} get-tuple-element(%p), index=0
  %gte.1 = f32[4,6,8]{2,1,0:T(8,128)} get-tuple-element(%p), index=1
  %gte.2 = f32[8,8]{1,0} get-tuple-element(%p), index=2
  %gte.3 = s32[]{:T(128)} get-tuple-element(%p), index=3
  %copy = s32[]{:T(128)S(6)} copy(%gte.0)
  %next = s32[]{:T(128)} add(%copy, %gte.3)
  %dot = f32[4,6,8]{2,1,0} dot(%gte.1, %gte.2), lhs_contracting_dims={2}, rhs_contracting_dims={0}
  ROOT %t = (s32[]{:T(128)}, f32[4,6,8]{2,1,0}, f32[8,8]{1,0}, s32[]{:T(128)}) tuple(%next, %dot,\
 %gte.2, %gte.3)
}

%cond (p.1: (s32[], f32[4,6,8], f32[8,8], s32[])) -> pred[] {
  %p.1 = (s32[]{:T(128)}, f32[4,6,8]{2,1,0}, f32[8,8]{1,0}, s32[]{:T(128)}) parameter(0)
  %limit = s32[]{:T(128)} constant(7)
  %i = s32[]{:T(128)} get-tuple-element(%p.1), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %limit), direction=LT
}

%small (a: f32[6,8]) -> f32[6,6] {
  %a = f32[6,8]{1,0} parameter(0)
  ROOT %c = f32[6,6]{1,0} convolution(%a, %a), dim_labels=bf_oi->bf
}

%big (b: f32[6,8]) -> f32[6,6] {
  %b = f32[6,8]{1,0} parameter(0)
  %c.1 = f32[6,6]{1,0} convolution(%b, %b), dim_labels=bf_oi->bf
  ROOT %c.2 = f32[6,6]{1,0} convolution(%b, %b), dim_labels=bf_oi->bf
}

ENTRY %main (x: f32[4,6,8], w: f32[8,8], k: s32[]) -> f32[6,6] {
  %x = f32[4,6,8]{2,1,0} parameter(0)
  %w = f32[8,8]{1,0} parameter(1)
  %k = s32[] parameter(2)
  %zero = s32[] constant(0)
  %one = s32[] constant(1)
  %start = s32[]{:T(128)} copy(%zero)
  %init = (s32[]{:T(128)}, f32[4,6,8]{2,1,0}, f32[8,8]{1,0}, s32[]{:T(128)}) tuple(%start, %x,\
 %w, %one)
  %loop = (s32[]{:T(128)}, f32[4,6,8]{2,1,0}, f32[8,8]{1,0}, s32[]{:T(128)}) while(%init),\
 condition=%cond, body=%body
  %out = f32[4,6,8]{2,1,0} get-tuple-element(%loop), index=1
  %row = f32[6,8]{1,0} slice(%out), slice={[0:1], [0:6], [0:8]}
  ROOT %pick = f32[6,6]{1,0} conditional(%k, %row, %row), branch_computations={%small, %big}
}
"""


def test_hlo_loop_state_tuples_and_a_trip_count_read_from_the_condition():
  # 7 iterations of a [4,6,8] x [8,8] dot (shapes through get-tuple-element of the loop
  # state; the step a loop-invariant state element), then the costlier branch: 2 convs.
  assert matmul_flops(_LOOP) == 7 * 2 * 4 * 6 * 8 * 8 + 2 * (2 * 6 * 6 * 8)


def test_hlo_known_trip_count_wins_and_an_unreadable_loop_is_unknown():
  trips = 'backend_config={"known_trip_count":{"n":"3"}}'
  known = _LOOP.replace("condition=%cond, body=%body", f"condition=%cond, body=%body, {trips}")
  assert matmul_flops(known) == 3 * 2 * 4 * 6 * 8 * 8 + 2 * (2 * 6 * 6 * 8)
  assert matmul_flops(_LOOP.replace("%start = s32[]{:T(128)} copy(%zero)",
                                    "%start = s32[]{:T(128)} copy(%k)")) is None
  assert matmul_flops(_LOOP.replace("direction=LT", "direction=NE")) is None
  # A bound carried in the loop state, passed through unchanged: element 3 (init 1).
  carried = _LOOP.replace("%limit = s32[]{:T(128)} constant(7)",
                          "%limit = s32[]{:T(128)} get-tuple-element(%p.1), index=3")
  assert matmul_flops(carried) == 1 * 2 * 4 * 6 * 8 * 8 + 2 * (2 * 6 * 6 * 8)


def test_hlo_gemm_custom_calls():
  gemm = """\
HloModule m

ENTRY %main (a: f16[2,32,64], b: f16[2,64,16]) -> f16[2,32,16] {
  %a = f16[2,32,64]{2,1,0} parameter(0)
  %b = f16[2,64,16]{2,1,0} parameter(1)
  %gemm = (f16[2,32,16]{2,1,0}, s8[4194304]{0}) custom-call(%a, %b),\
 custom_call_target="__cublas$gemm",\
 backend_config={"operation_queue_id":"0","gemm_backend_config":{"alpha_real":1,\
"dot_dimension_numbers":{"lhs_contracting_dimensions":["2"],"rhs_contracting_dimensions":["1"],\
"lhs_batch_dimensions":["0"],"rhs_batch_dimensions":["0"]}}}
  ROOT %out = f16[2,32,16]{2,1,0} get-tuple-element(%gemm), index=0
}
"""
  assert matmul_flops(gemm) == 2 * 2 * 32 * 16 * 64
  conv = gemm.replace("__cublas$gemm", "__cudnn$convForward")
  assert matmul_flops(conv) is None
  other = gemm.replace("__cublas$gemm", "AllocateBuffer")  # no matmul: counts nothing
  assert matmul_flops(other) == 0
  assert matmul_flops("not hlo") is None
