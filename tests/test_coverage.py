"""The coverage report: every primitive listed, statuses read from the rule tables."""

from jax.extend.core import Primitive
from jax.extend.core import primitives as jax_primitives

from fungrad import coverage
from fungrad._src import rules

# Primitives that plain jnp / jax.nn code is made of: each must have a rule.
CORE = """
add sub mul div neg max min pow integer_pow square sqrt rsqrt cbrt exp exp2 log log1p expm1
tanh logistic sin cos tan asin acos atan atan2 sinh cosh asinh acosh atanh abs sign floor
ceil round is_finite erf erfc erf_inv lgamma digamma select_n clamp eq ne lt le gt ge and or
not xor convert_element_type reduce_sum reduce_max reduce_min reduce_prod argmax argmin
broadcast_in_dim reshape squeeze transpose rev slice dynamic_slice dynamic_update_slice
concatenate pad iota gather scatter_add dot_general cumsum cumprod cummax cummin
cumlogsumexp copy stop_gradient sort real imag complex conj jit closed_call custom_jvp_call
custom_vjp_call
""".split()


def test_every_primitive_is_listed_once():
    rows = coverage.coverage_table()
    names = [row.name for row in rows]
    expected = sorted(n[:-2] for n in dir(jax_primitives) if n.endswith("_p"))
    assert names[:len(expected)] == expected
    assert all(name.startswith("*") for name in names[len(expected):])  # jax's unlisted ones
    assert "*stack" in names and len(set(names)) == len(names)
    assert {row.status for row in rows} <= set(coverage.STATUSES)
    assert sum(coverage.totals(rows).values()) == len(rows)


def test_statuses_follow_the_rule_tables():
    rows = {row.name: row for row in coverage.coverage_table()}
    assert rows["add"].status == "jvp+transpose"  # linear
    assert rows["sin"].status == "jvp"
    assert rows["lt"].status == "zero-derivative"
    assert rows["add_jaxvals"].jax_name == "add_any"
    fake = Primitive("fungrad_test_fake")
    assert coverage.status_of(fake) == "missing"
    rules.not_applicable.add(fake)
    try:
        assert coverage.status_of(fake) == "n/a"
    finally:
        rules.not_applicable.discard(fake)


def test_taylor_column_follows_the_rule_tables():
    from fungrad._src.taylor import taylor_rules

    rows = {row.name: row for row in coverage.coverage_table()}
    assert {row.taylor for row in rows.values()} <= set(coverage.TAYLOR_STATUSES)
    assert sum(coverage.taylor_totals(list(rows.values())).values()) == len(rows)
    for name in ("sin", "exp", "mul", "dot_general", "scan", "cond", "while", "jit", "custom_jvp_call"):
        assert rows[name].taylor == "rule", name
    assert rows["lgamma"].taylor == "via-jvp"  # no recurrence: the generic rule from its JVP
    assert rows["lt"].taylor == "zero"
    fake = Primitive("fungrad_test_fake_taylor")
    assert coverage.taylor_status_of(fake) == "-"
    rules.jvp_rules[fake] = lambda primals, tangents: (primals[0], tangents[0])
    try:
        assert coverage.taylor_status_of(fake) == "via-jvp"
        taylor_rules[fake] = lambda primals, series: (primals[0], series[0])
        assert coverage.taylor_status_of(fake) == "rule"
    finally:
        rules.jvp_rules.pop(fake)
        taylor_rules.pop(fake, None)


def test_every_differentiable_core_primitive_has_a_taylor_path():
    rows = {row.name: row for row in coverage.coverage_table()}
    without = [name for name in CORE if rows[name].taylor == "-"]
    assert not without, f"fungrad.jet cannot handle: {without}"


def test_core_primitives_are_covered():
    for name in CORE:  # each name must exist in this jax, else the list is wrong
        assert hasattr(jax_primitives, f"{name}_p"), name
    rows = {row.name: row for row in coverage.coverage_table()}
    missing = [name for name in CORE if rows[name].status in ("missing", "n/a")]
    assert not missing, f"no rule for core primitives: {missing}"


# What the JVP rules of the core primitives emit on tangents: reverse mode transposes them.
LINEAR = """
add add_jaxvals sub neg mul div dot_general reduce_sum broadcast_in_dim reshape transpose
convert_element_type select_n squeeze slice pad concatenate rev gather scatter_add
dynamic_slice dynamic_update_slice cumsum copy real imag complex conj jit
""".split()


def test_linear_core_primitives_can_be_transposed():
    without = [name for name in LINEAR
               if getattr(jax_primitives, f"{name}_p") not in rules.transpose_rules]
    assert not without, f"no transpose rule: {without}"


def test_printed_table(capsys):
    coverage.main([])
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["primitive", "status", "taylor"]
    assert "totals: jvp+transpose" in out
    assert "taylor (fungrad.jet): rule" in out
    for row in coverage.coverage_table()[:5]:
        assert row.name in out
    coverage.main(["--status", "zero-derivative"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3] == "" and all("zero-derivative" in line for line in lines[2:-3])


# --- against jax's own rule table (read here only: jax is the reference in tests) -----

# jax registers JVP rules for these only to raise: an opaque callback has no derivative.
JAX_RULE_ONLY_RAISES = {"pure_callback", "io_callback", "ffi_call"}

# Primitives with a jax JVP rule that fungrad does not cover yet, and why.
NOT_YET = {
    # jax-internal plumbing of its own AD, state and staging, never in a user's program
    "accum_grad_in_ref": "jax's own ref-gradient accumulation",
    "eval_jaxpr": "jax's internal loop lowering",
    "run_state": "Pallas/state discharge internals",
    "tie": "jax-internal ordering", "stage": "jax-internal staging",
    "to_edtype": "extended dtypes", "from_edtype": "extended dtypes",
    "call_hi_primitive": "hijax (experimental)", "box_get": "hijax (experimental)",
    "box_set": "hijax (experimental)", "new_box": "hijax (experimental)",
    "log_extend": "hijax (experimental)", "log_read": "hijax (experimental)",
    "new_log": "hijax (experimental)",
    # explicit-sharding reduced/unreduced axes (experimental in this jax)
    "all_gather_reduced": "unreduced/reduced shardings", "preduced": "unreduced/reduced shardings",
    "reduced_vary_cast_p": "unreduced/reduced shardings",
    "vary_unreduced_cast_p": "unreduced/reduced shardings",
    "unreduced_psum": "unreduced/reduced shardings",
    "unreduced_reduce_scatter": "unreduced/reduced shardings",
    "buffer_callback": "jax.experimental.buffer_callback",
    "compute_on": "jax.experimental.compute_on",
    "xla_metadata_value": "jax.experimental.xla_metadata",
    "remat_opt": "jax.custom_vjp(optimize_remat=True)",
    "dce_sink": "lax.dce_sink",
}


def _prims_by_name() -> dict[str, Primitive]:
    from fungrad._src import jaxutil

    found = {str(getattr(jax_primitives, n)): getattr(jax_primitives, n)
             for n in dir(jax_primitives) if n.endswith("_p")}
    found.update((str(p), p) for p in jaxutil.internal_prims.values())
    return found


def test_every_primitive_jax_differentiates_is_covered():
    from jax._src.interpreters import ad

    prims = _prims_by_name()
    uncovered = [row.name for row in coverage.coverage_table()
                 if prims[row.jax_name.lstrip("*")] in ad.primitive_jvps
                 and row.status in ("missing", "n/a")
                 and row.jax_name.lstrip("*") not in JAX_RULE_ONLY_RAISES]
    assert not uncovered, f"jax differentiates these, fungrad does not: {uncovered}"


def test_no_primitive_jax_differentiates_goes_unnoticed():
    # Every primitive object in jax's loaded modules with a jax JVP rule is either in the
    # coverage report or named in NOT_YET: a new jax release adding one fails here.
    import sys

    from jax._src.interpreters import ad

    listed = set(_prims_by_name().values())
    unknown = set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("jax._src") or module is None:
            continue
        for value in vars(module).values():
            if (isinstance(value, Primitive) and value in ad.primitive_jvps
                    and value not in listed and str(value) not in NOT_YET):
                unknown.add(str(value))
    assert not unknown, f"primitives jax differentiates, unknown to fungrad: {sorted(unknown)}"


def test_every_not_applicable_primitive_refuses_with_a_message_naming_it():
    prims = _prims_by_name()
    for row in coverage.coverage_table():
        if row.status != "n/a":
            continue
        prim = prims[row.jax_name.lstrip("*")]
        try:
            rules.jvp_rules[prim]([], [])
        except NotImplementedError as err:
            assert str(prim) in str(err), (row.name, str(err))
        else:
            raise AssertionError(f"{row.name}'s rule did not refuse")
