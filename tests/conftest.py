"""Shared fixtures: lmbot's own tests build on the plugin testing kit (bot.testing), so the
tiny models, the converted SmolLM2 and the apps are the ones plugin authors get."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import sys
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from bot.app import App
from bot.config import Config
from bot.inference.client import LocalInferenceClient
from bot.inference.registry import BUILTIN_ROLES
from bot.testing import TestModels, make_app
from bot.testing import make_config as kit_config
from tests.loopback_only import sitecustomize as _loopback_only  # noqa: F401  (import = the guard)

# The kit's fixtures (lmbot_app, lmbot_models, ...); a no-op when the pytest11 entry point
# already loaded them under this name.
pytest_plugins = ["bot.testing.pytest_plugin"]

# No test may reach the network: the hub is "offline" for every test and every
# worker process they start (workers inherit the environment), and the import of
# tests.loopback_only above fails any connection to a host other than loopback.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
LOOPBACK_ONLY = str(Path(__file__).parent / "loopback_only")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (LOOPBACK_ONLY, os.environ.get("PYTHONPATH")) if p)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `lmbot ask` run by a test answers in its own process and leaves no warm lmbot behind
# (tests/test_ask_warm.py turns it on where it is the subject).
os.environ["LMBOT_ASK_KEEP_ALIVE_S"] = "0"

# No test touches the user's own data: HOME and XDG's data, config and state folders point
# into a folder of this session's (inherited by every process a test starts), so a default
# such as ~/.local/share/lmbot/quiz.sqlite3 lands there. The cache stays the user's, through
# a link: converted models and ONNX exports are shared between runs (with file locks).
USER_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").resolve()
SESSION_HOME = Path(tempfile.mkdtemp(prefix="lmbot-home-"))
(SESSION_HOME / ".cache").symlink_to(USER_CACHE, target_is_directory=True)
os.environ["HOME"] = str(SESSION_HOME)
os.environ["XDG_CACHE_HOME"] = str(USER_CACHE)
os.environ["XDG_DATA_HOME"] = str(SESSION_HOME / ".local" / "share")
os.environ["XDG_CONFIG_HOME"] = str(SESSION_HOME / ".config")
os.environ["XDG_STATE_HOME"] = str(SESSION_HOME / ".local" / "state")
atexit.register(shutil.rmtree, SESSION_HOME, ignore_errors=True)  # unlinks the link; the cache stays

ROLES = {r.name: r for r in BUILTIN_ROLES}

# Property-based tests: a fixed seed by default, so a clean checkout is green or red the same
# way every time; `HYPOTHESIS_PROFILE=fuzz python -m pytest -k "hypothesis or arbitrary"` runs
# a long random search instead (see README, Tests).
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("fuzz", derandomize=False, max_examples=4000, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
FUZZ_FACTOR = 40 if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else 1


def examples(n: int) -> int:
    """``n`` property examples in CI, many more in the fuzz profile."""
    return n * FUZZ_FACTOR


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C works in the processes the tests start, and an xdist worker's temporary folders are
    under a short root of its own.

    A suite started in the background by a non-interactive shell (``cmd &``) inherits SIGINT
    ignored, and so would every ``lmbot`` a test starts: the Ctrl-C tests would see it ignored.

    xdist puts each worker's under ``.../pytest-N/popen-gwN/``; the warm lmbot's socket in a
    test's folder would then pass the 108 bytes a Unix socket's path may have."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    worker = getattr(config, "workerinput", None)
    if worker is not None:
        config.option.basetemp = tempfile.mkdtemp(prefix=f"lmbot-{worker['workerid']}-")


def pytest_unconfigure(config: pytest.Config) -> None:
    if getattr(config, "workerinput", None) is not None and config.option.basetemp:
        shutil.rmtree(config.option.basetemp, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_installed_plugins(lmbot_ignore_installed_plugins: None) -> None:
    """The suite tests lmbot, not whatever plugins the environment has installed."""


@pytest.fixture(scope="session")
def cache_dir(lmbot_cache_dir: Path) -> Path:
    return lmbot_cache_dir


@pytest.fixture(scope="session")
def tiny_gpt2(lmbot_models: TestModels) -> Path:
    return lmbot_models.tiny_gpt2


@pytest.fixture(scope="session")
def tiny_llama(lmbot_models: TestModels) -> Path:
    return lmbot_models.tiny_llama


@pytest.fixture(scope="session")
def tiny_bert_mlm(lmbot_models: TestModels) -> Path:
    return lmbot_models.tiny_bert_mlm


@pytest.fixture(scope="session")
def tiny_bert_nsp(lmbot_models: TestModels) -> Path:
    return lmbot_models.tiny_bert_nsp


@pytest.fixture(scope="session")
def tiny_classifier(lmbot_models: TestModels) -> Path:
    return lmbot_models.tiny_classifier


@pytest.fixture(scope="session")
def tiny_t5(lmbot_models: TestModels) -> Path:
    return lmbot_models.tiny_t5


@pytest.fixture(scope="session")
def smollm_dir(lmbot_models: TestModels) -> Path:
    """The packaged SmolLM2 converted once to safetensors (the product's own code path).

    Kept between runs in ``LMBOT_TEST_MODEL_CACHE`` (default ``~/.cache/lmbot/test-models``).
    """
    return lmbot_models.smollm2


def make_config(
    cache_dir: Path,
    models: dict[str, Path | str] | None = None,
    plugin_options: dict[str, dict[str, Any]] | None = None,
    **inference: Any,
) -> Config:
    """The kit's test config with every built-in loaded: quiz scores next to the test's cache."""
    options = {"study": {"quiz_db": str(cache_dir / "quiz.sqlite3")}, **(plugin_options or {})}
    return kit_config(cache_dir, models, options, **inference)


@pytest.fixture
def config_factory(cache_dir: Path):  # type: ignore[no-untyped-def]
    def build(models: dict[str, Path | str] | None = None, **inference: Any) -> Config:
        return make_config(cache_dir, models, **inference)

    return build


@pytest.fixture
def held_port() -> Iterator[Callable[[], int]]:
    """Ports on 127.0.0.1 held for the whole test, so a parallel test cannot take one.

    Each is bound with SO_REUSEADDR and never listened on: a connection is refused (a closed port),
    yet a server that also sets SO_REUSEADDR (http.server, prometheus_client) may still bind it.
    A port bound then released for the test to reuse could be taken in between.
    """
    held: list[socket.socket] = []

    def hold() -> int:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        held.append(sock)
        return int(sock.getsockname()[1])

    yield hold
    for sock in held:
        sock.close()


@pytest.fixture(scope="session")
async def causal_service(cache_dir: Path, tiny_gpt2: Path) -> AsyncIterator[LocalInferenceClient]:
    """One service on the tiny GPT-2, shared by tests that only read from it."""
    client = LocalInferenceClient(make_config(cache_dir, {"causal_lm": tiny_gpt2}), ROLES)
    await client.start()
    yield client
    await client.close()


@pytest.fixture
async def app_factory(cache_dir: Path) -> AsyncIterator[Any]:
    """Apps with every built-in plugin (and only those, unless a test adds some)."""
    apps: list[App] = []

    def build(
        models: dict[str, Path | str] | None = None,
        plugins: list[tuple[object, str]] = (),  # type: ignore[assignment]
        *,
        builtins: bool = True,
        entry_points: bool = False,
    ) -> App:
        if entry_points:
            app: App = App(make_config(cache_dir, models), extra_plugins=plugins, builtins=builtins)
        else:
            app = make_app(*plugins, cache_dir=cache_dir, models=models, builtins=builtins)
        apps.append(app)
        return app

    yield build
    for app in apps:
        await app.close()


SHARED_APPS_KEPT = 4  # apps kept running at once by `shared_app` (each holds a worker process)


@pytest.fixture(scope="session")
async def _shared_apps() -> AsyncIterator[OrderedDict[tuple[tuple[str, str], ...], App]]:
    apps: OrderedDict[tuple[tuple[str, str], ...], App] = OrderedDict()
    yield apps
    for app in apps.values():
        await app.close()


@pytest.fixture
async def shared_app(
    _shared_apps: OrderedDict[tuple[tuple[str, str], ...], App], cache_dir: Path
) -> AsyncIterator[Callable[..., App]]:
    """Like ``app_factory``, for tests that only ask questions: one app per set of models, shared
    by the session's tests (datasette's session-scoped app), so its workers start and load their
    models once. A test that patches the app, counts its requests, reads its logs or needs a cold
    model uses ``app_factory``. The least recently used apps beyond ``SHARED_APPS_KEPT`` close."""
    evicted: list[App] = []

    def get(models: dict[str, Path | str] | None = None) -> App:
        key = tuple(sorted((role, str(path)) for role, path in (models or {}).items()))
        if key in _shared_apps:
            _shared_apps.move_to_end(key)
        else:
            _shared_apps[key] = make_app(cache_dir=cache_dir, models=models, builtins=True)
            while len(_shared_apps) > SHARED_APPS_KEPT:
                evicted.append(_shared_apps.popitem(last=False)[1])
        return _shared_apps[key]

    yield get
    for app in evicted:
        await app.close()


# Skips that hide a missing service: reported always (pyproject's addopts has -rs), and failures
# in CI (CI=true, as CI services set it), where PostgreSQL and Ray must be present. .ci/run
# stays the README's test command; this is how it makes them mandatory.
MANDATORY_IN_CI = ("postgres", "ray")


def mandatory_skip(where: str, reason: str, environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether a skip raised at ``where`` for ``reason`` must fail this run instead."""
    if environ.get("CI", "").lower() not in ("true", "1"):
        return False
    text = f"{where} {reason}".lower()
    return any(word in text for word in MANDATORY_IN_CI)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(report.longrepr, tuple) and not hasattr(report, "wasxfail"):
        where, _, reason = report.longrepr
        if mandatory_skip(str(where), str(reason)):
            report.outcome = "failed"
            report.longrepr = f"skipped, but CI makes the PostgreSQL and Ray tests mandatory: {reason}"


# The fast tier is `pytest -m "not slow"` (docs/testing.md). These tests took over about 4.5 s
# each (setup included) in a two-worker run of the suite or of the fast tier on a 2-core machine
# (`--durations=0`): nested pytest sessions, the fault benchmark, workers crashed, stopped or
# restarted, CLI subprocesses, Discord clients, SmolLM2 forward passes. Add a test that gets
# that slow; every parameter of a test named here is slow.
SLOW = frozenset(
    f"tests/{test}"
    for test in (
        "test_ask_warm.py::test_a_changed_setting_replaces_the_warm_lmbot",
        "test_ask_warm.py::test_a_variable_a_plugin_declared_replaces_the_warm_lmbot",
        "test_ask_race.py::test_two_asks_racing_start_exactly_one_warm_lmbot_and_both_are_answered",
        "test_ask_interrupt.py::test_ctrl_c_while_the_worker_starts_is_one_line_and_exit_130",
        "test_cli.py::test_a_metrics_port_in_use_is_one_line_and_the_bot_runs_on_without_metrics",
        "test_discord_reconnect_log.py::test_a_gateway_dropped_mid_run_is_one_line_and_the_traceback_only_at_debug",
        "test_followup_deadline.py::test_a_later_message_that_never_comes_is_answered_at_its_deadline",
        "test_lens.py::test_smollm2s_layer_12_mlp_matters_more_than_any_other_middle_layers",
        "test_lens.py::test_another_threads_forward_during_the_lens_is_neither_recorded_nor_knocked_out",
        "test_lens.py::test_a_lens_that_fails_mid_forward_leaves_the_model_whole",
        "test_startup_network.py::test_an_outage_at_start_up_that_ends_logs_in_and_answers",
        "test_ask_warm.py::test_a_dead_warm_lmbot_never_loses_an_ask",
        "test_ask_warm.py::test_a_package_named_bot_in_the_working_folder_changes_nothing",
        "test_ask_warm.py::test_an_edited_topic_toml_is_shown_on_the_next_ask",
        "test_ask_warm.py::test_an_idle_warm_lmbot_stops_itself",
        "test_ask_warm.py::test_asks_from_two_folders_share_one_warm_lmbot",
        "test_ask_warm.py::test_asks_that_leave_no_warm_lmbot",
        "test_ask_warm.py::test_the_ask_after_a_model_ask_is_answered_warm_with_the_same_numbers",
        "test_attention.py::test_attention_command_through_the_service",
        "test_attention.py::test_bad_requests_get_a_clear_answer",
        "test_attention.py::test_causal_weights_equal_an_eager_forward_batched_and_alone",
        "test_attention.py::test_concurrent_requests_batch_without_changing_a_weight",
        "test_attention.py::test_without_a_masked_lm_one_line_says_so",
        "test_bad_input.py::test_arbitrary_text_never_raises",
        "test_bad_input.py::test_nasty_inputs_get_short_answers",
        "test_cli.py::test_a_model_backed_answer_leaves_the_terminal_quiet",
        "test_cli.py::test_ask_nexttoken_on_the_offline_model",
        "test_cli.py::test_ctrl_c_during_a_cold_ask_is_one_line",
        "test_discord.py::test_busy_queue_answers_at_once",
        "test_discord.py::test_nexttoken_step_buttons_round_trip",
        "test_discord.py::test_shutdown_answers_in_flight_interactions_then_exits_zero",
        "test_discord.py::test_slash_command_is_deferred_then_answered_with_embed_and_chart",
        "test_discord_safety.py::test_a_blocking_handler_cannot_delay_acknowledgements",
        "test_discord_safety.py::test_button_presses_count_against_the_cooldown",
        "test_discord_shards.py::test_auto_runs_every_shard_discord_recommends_in_one_process",
        "test_docs.py::test_the_guides_plugins_load_and_answer",
        "test_docs.py::test_the_guides_tests_pass_with_the_kit",
        "test_engines.py::test_bf16_stays_within_its_bound_of_fp32_on_smollm",
        "test_engines.py::test_engine_next_token_equals_transformers_batched_and_alone",
        "test_engines.py::test_engine_score_equals_transformers_batched_and_alone",
        "test_faults_bench.py::test_fault_benchmark_over_the_discord_client",
        "test_faults_bench.py::test_fault_benchmark_quick_mode_answers_every_request",
        "test_handler_faults.py::test_a_command_a_handler_runs_keeps_the_front_ends_loop_for_its_model_requests",
        "test_headline_commands.py::test_compare_offline_without_masked_lm_still_answers",
        "test_headline_commands.py::test_compare_shows_both_models",
        "test_headline_commands.py::test_mask_equals_fill_mask_pipeline",
        "test_headline_commands.py::test_nexttoken_buttons_step_through_generation",
        "test_headline_commands.py::test_nexttoken_equals_softmax_of_last_logits",
        "test_headline_commands.py::test_ngram_counts_and_probabilities_are_exact",
        "test_headline_commands.py::test_ngram_counts_symbols_as_words_on_both_sides",
        "test_headline_commands.py::test_ngram_perplexities_equal_direct_computation",
        "test_hub.py::test_a_download_longer_than_the_deadline_is_explained",
        "test_hub.py::test_fetch_shows_progress_then_the_bot_runs_from_the_download_offline",
        "test_hub.py::test_first_use_downloads_in_the_worker",
        "test_inside_views_front_ends.py::test_the_three_commands_in_the_console",
        "test_inside_views_front_ends.py::test_the_three_commands_on_discord",
        "test_lens.py::test_a_knockout_equals_a_model_with_those_weights_zeroed",
        "test_lens.py::test_every_layer_equals_the_hidden_states_through_norm_and_head",
        "test_lens.py::test_lens_bad_input_gets_a_short_reply",
        "test_lens.py::test_lens_command_through_the_service",
        "test_ngram_lesson.py::test_unsmoothed_bigram_is_the_course_count",
        "test_observability.py::test_prometheus_endpoint_and_lmbot_stats",
        "test_observability.py::test_stats_is_owner_only_and_counts_requests",
        "test_plugins.py::test_a_plugins_own_task_runs_in_the_worker",
        "test_plugins.py::test_the_bot_process_never_imports_torch",
        "test_plugins.py::test_the_suite_passes_with_a_third_party_plugin_installed",
        "test_ray_backend.py::test_bot_processes_sharing_a_ray_cluster_in_a_loopback_only_namespace",
        "test_ray_backend.py::test_ray_backend_suite_in_a_loopback_only_namespace",
        "test_review.py::test_a_far_off_round_guess_becomes_a_card",
        "test_round.py::test_a_round_left_open_by_a_restart_is_finished_by_its_next_press",
        "test_round.py::test_a_server_round_takes_one_hidden_guess_each_and_shows_everyone_at_the_end",
        "test_round.py::test_guess_probabilities_equal_transformers_batched_and_alone",
        "test_round.py::test_one_player_in_the_console_gets_results_at_once",
        "test_round_discord.py::test_five_players_play_a_round_on_discord",
        "test_sample.py::test_concurrent_commands_batch_and_each_draw_equals_generate_alone",
        "test_sample.py::test_draws_equal_generate_with_the_same_seed_batched_and_alone",
        "test_sample.py::test_reply_explains_each_stage_and_the_seed",
        "test_sample.py::test_stages_follow_the_definitions",
        "test_scores.py::test_a_locked_database_slows_nothing_else",
        "test_scores.py::test_a_storage_fault_costs_one_clear_line_and_harms_nothing",
        "test_service.py::test_a_deadline_while_workers_start_says_so",
        "test_service.py::test_a_lone_request_does_not_wait_for_company_a_burst_does",
        "test_service.py::test_batched_results_equal_alone_and_reference",
        "test_service.py::test_cancelled_request_is_removed",
        "test_service.py::test_expired_request_is_dropped_without_computing",
        "test_service.py::test_input_limits_give_clear_errors",
        "test_service.py::test_killed_worker_fails_in_flight_and_is_restarted",
        "test_service.py::test_least_recently_used_model_is_unloaded_past_the_budget",
        "test_service.py::test_models_load_lazily_once_and_share_the_budget",
        "test_service.py::test_out_of_memory_batch_is_split_in_halves",
        "test_service.py::test_queue_full_fails_at_once_with_retry_hint",
        "test_service_faults.py::test_a_crash_is_pinned_on_the_request_that_caused_it",
        "test_service_faults.py::test_a_stopped_only_worker_is_replaced",
        "test_service_faults.py::test_a_stopped_worker_of_two_is_replaced_while_the_other_serves",
        "test_service_faults.py::test_a_task_returning_a_tensor_never_brings_torch_into_the_bot_process",
        "test_service_faults.py::test_a_worker_stopped_while_it_loads_is_replaced",
        "test_service_faults.py::test_one_user_cannot_hold_more_than_their_share",
        "test_study.py::test_a_card_offers_its_command_and_a_quiz",
        "test_study.py::test_the_masked_lm_card_offline_answers_the_student",
        "test_surprise.py::test_bad_text_gets_a_clear_answer",
        "test_surprise.py::test_byte_pieces_show_as_hex_and_batching_changes_nothing",
        "test_surprise.py::test_logprobs_equal_a_direct_forward_batched_and_alone",
        "test_surprise.py::test_ngram_side_scores_symbols_and_emoji_as_words",
        "test_surprise.py::test_surprise_command_with_the_ngram_model",
        "test_surprise.py::test_surprise_says_when_the_two_perplexities_are_not_comparable",
        "test_tasks.py::test_next_token_equals_reference_batched_and_alone",
        "test_tasks.py::test_score_equals_reference",
        "test_teaching_replies.py::test_a_chart_that_fails_to_draw_leaves_the_reply_without_it",
        "test_teaching_replies.py::test_a_model_token_with_dollar_signs_still_gives_a_chart",
        "test_teaching_replies.py::test_compare_continues_the_text_before_the_hidden_word",
        "test_teaching_replies.py::test_compare_hides_a_named_span_that_is_not_a_word",
        "test_teaching_replies.py::test_compare_picks_a_sensible_hidden_word",
        "test_teaching_replies.py::test_compare_shows_the_hidden_words_own_probability_and_rank",
        "test_teaching_replies.py::test_compare_times_warm_models_only",
        "test_teaching_replies.py::test_dollar_signs_in_the_text_still_give_a_chart",
        "test_teaching_replies.py::test_nexttoken_explains_entropy_with_a_number_a_student_can_check",
        "test_teaching_replies.py::test_nsp_fallback_verdict_comes_from_numbers_equal_to_transformers",
        "test_teaching_replies.py::test_nsp_fallback_verdicts_on_the_offline_model",
        "test_teaching_replies.py::test_summarize_checks_what_it_claims_and_says_when_it_was_cut",
        "test_teaching_replies.py::test_summarize_counts_the_tokens_generate_wrote",
        "test_teaching_replies.py::test_summarize_has_one_length_limit",
        "test_teaching_replies.py::test_summarize_says_it_may_be_wrong_and_flags_what_is_not_in_the_text",
        "test_teaching_replies.py::test_the_japanese_prompt_from_the_issue_shows_hex_rows",
        "test_teaching_replies.py::test_tokens_that_are_part_of_a_character_show_their_bytes",
        "test_teaching_replies.py::test_without_a_masked_lm_students_get_a_plain_line_and_the_log_the_key",
        "test_topic_commands.py::test_adapt_lora_closed_form_for_llama",
        "test_topic_commands.py::test_adapt_lora_counts_equal_peft_on_the_model",
        "test_topic_commands.py::test_adapt_says_nothing_was_trained_when_the_worker_refuses",
        "test_topic_commands.py::test_adapt_shows_both_prompts_as_the_model_reads_them",
        "test_topic_commands.py::test_adapt_train_by_default_only_on_gpu_workers",
        "test_topic_commands.py::test_adapt_train_through_the_service",
        "test_topic_commands.py::test_complexity_counts_and_timings",
        "test_topic_commands.py::test_complexity_counts_the_course_lengths_and_times_what_fits",
        "test_topic_commands.py::test_complexity_reference_lines_go_through_the_longest_timed_length",
        "test_topic_commands.py::test_jargon_in_complexity_and_adapt_gets_a_plain_line",
        "test_topic_commands.py::test_lora_run_trains_then_leaves_the_served_model_untouched",
        "test_topic_commands.py::test_nsp_equals_the_nsp_head",
        "test_topic_commands.py::test_nsp_without_a_head_falls_back_to_labelled_coherence",
        "test_topic_commands.py::test_sentiment_offline_head_on_the_packaged_embedder",
        "test_topic_commands.py::test_sentiment_says_forced_choice_and_calibrates_by_the_label_prior",
        "test_topic_commands.py::test_sentiment_times_warm_inference_only",
        "test_topic_commands.py::test_sentiment_with_a_classifier_and_a_prompted_lm",
        "test_topic_commands.py::test_summarize_offline_uses_a_labelled_prompted_lm",
        "test_topic_commands.py::test_summarize_with_t5_equals_generate",
        "test_topic_commands.py::test_topic_try_beside_a_name_runs_that_card_or_says_why_not",
        "test_topic_content.py::test_every_card_command_runs_as_written",
    )
)
SLOW_TIMEOUT_S = 1200

# Files with the longest tests go to the xdist workers first, so the run does not end waiting on one.
LONGEST_FIRST = (
    "tests/test_faults_bench.py",
    "tests/test_ray_backend.py",
    "tests/test_teaching_replies.py",
    "tests/test_topic_commands.py",
    "tests/test_lens.py",
    "tests/test_service_faults.py",
    "tests/test_ask_warm.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path, _, name = item.nodeid.partition("::")
        if f"{path}::{name.split('[')[0]}" in SLOW:
            item.add_marker(pytest.mark.slow)
            if item.get_closest_marker("timeout") is None:
                # pyproject's timeout is a hang guard; a test that takes two minutes on a quiet
                # machine takes over five while a second copy of the suite loads it.
                item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
    first = {path: rank for rank, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.nodeid.partition("::")[0], len(first)))


# Discord clients a test started: one left running logs in to the next test's fake Discord
# (discord.py's base URL is patched per test) and prints into that test's output.
_clients: weakref.WeakSet[Any] = weakref.WeakSet()


@pytest.fixture(autouse=True)
def _no_discord_client_left_running(request: pytest.FixtureRequest) -> Any:
    """Fail the test that leaves a bot client open, naming it, instead of a later test at random."""
    if "discord" not in sys.modules:
        yield
        return
    from bot.frontends.discord.client import LmbotClient

    original = LmbotClient.__init__

    def recording(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _clients.add(self)

    LmbotClient.__init__ = recording  # type: ignore[method-assign]
    try:
        yield
    finally:
        LmbotClient.__init__ = original  # type: ignore[method-assign]
    # Started = it logged in (or tried to); a client only built, never run, holds nothing.
    left = [c for c in list(_clients) if c.http.token is not None and not c.is_closed()]
    _clients.clear()
    assert not left, f"{request.node.nodeid} left {len(left)} Discord client(s) open"
