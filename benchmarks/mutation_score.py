"""Summarise a `mutmut run` (the last step of `make mutate`): per file and overall.

Reads mutmut's result files under ``mutants/`` (``<file>.meta``), so run it from the project root
after ``mutmut run``. For every file in ``[tool.mutmut] only_mutate`` it prints killed, timeout,
survived, no-tests and total counts, the survivors judged *equivalent* (the mutation cannot change
behaviour: see ``EQUIVALENT`` below) and the score

    score = (killed + timeout) / (total - equivalent)

A timeout is a detected mutant (it made a test loop or crawl). Survivors that are not listed as
equivalent are printed with their diff: each is a gap in the tests, or a new equivalent mutant to
add to ``EQUIVALENT`` with its reason.

``EQUIVALENT`` matches a survivor by its function and the mutated line (not by mutmut's number,
which shifts whenever the function changes), so an entry goes stale only when that line changes;
stale entries are reported. ``--strict`` exits with status 1 when any survivor is unexplained.
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import io
import re
import sys
import tokenize
from collections import Counter, defaultdict
from pathlib import Path

from mutmut.configuration import config
from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files

# Survivors that cannot change behaviour. Each rule: (function regex, line regex, why, strings_only).
# ``function`` is matched in full against the mutated function as ``name`` or ``Class.method``.
# ``strings_only`` rules apply only where the mutation changed nothing but one string literal (or replaced
# it with ``None``); their regex is searched in the original line and the line above it (the statement a
# continuation line belongs to). Other rules' regex is searched in ``"<original> => <mutant>"`` (both
# lines stripped; the mutant is empty when the line was deleted).
MESSAGE = "error-message text: argument names and hints in ValueError/KeyError/RuntimeError messages"
REASON = "Decision.reason text: human-readable, logged, never parsed past its first word"
EQUIVALENT: list[tuple[str, str, str, bool]] = [
    (
        r".*",
        r"return [\w.]+, f?\"|why = |reason = |measure = |^\s*f?\"(keep|hold|change|forced|goodput|memory|noise)\b",
        REASON,
        True,
    ),
    (r".*", r"raise \w+\(|checked\(|_make\(|^\s*f?\"[^\"]*\"\s*,?\s*\)?$", MESSAGE, True),
    (
        # checked(name, value, check, example): the name and the example only appear in the message.
        r".*",
        r"^(?P<head>.*)checked\((?P<name>[^,]+), (?P<rest>.+), (?P<example>[^,]+)\)(?P<tail>.*) => "
        r"(?P=head)checked\(([^,]+, (?P=rest), (?P=example)|(?P=name), (?P=rest), [^,]+)\)(?P=tail)$",
        "the option name or the example a one-line error quotes (message text only)",
        False,
    ),
    (r"SchedulePolicy\.propose_with_reason", r"^passed .*=>|passed \+= 1 =>", REASON, False),
    (
        r"SchedulePolicy\.propose_with_reason",
        r"zip\(self\.milestones, self\.factors, strict=True\).*=> .*zip\(self\.milestones, self\.factors, (strict=(False|None))?\)",
        "zip(strict=True): milestones and factors have equal lengths by construction (__init__ checks it)",
        False,
    ),
    (
        r"BatchGrid\.(round|above|below)",
        r"if self\._all_ints or b < m: => if self\._all_ints or b <= m:",
        "b < m vs b <= m: at b == m both branches return m, which is admissible",
        False,
    ),
    (
        r"BatchSizeController\.decide",
        r"if gain > self\.hysteresis \+ 1e-12: => if gain >= self\.hysteresis \+ 1e-12:",
        "> vs >= on a float threshold offset by 1e-12: equality does not occur",
        False,
    ),
    (
        r"BatchSizeController\.decide",
        r"^step_times=\(\), => $",
        "clearing ctx.step_times after feeding them to the model: no policy reads them",
        False,
    ),
    (
        r"_vectorized_microbatch_stats",
        r"others = \{.* if (\w+) not in params\} => others = \{.* if \1 in params\}",
        "functional_call falls back to the module's own (equal) parameters for names missing from the dict",
        False,
    ),
    (
        r"looped_microbatch_stats",
        r"if params else torch\.float32 => .*\(params\) or True|if params else None => .*\(params\) or True",
        "no parameters: unreachable, torch.autograd.grad raises first (see the README's bug note)",
        False,
    ),
    (
        r"BatchGrid\.contains",
        r"batch_size < self\.multiple or .* => .*batch_size <= self\.multiple or",
        "b < m vs b <= m: at b == m both branches return m, which is admissible",
        False,
    ),
    (
        r"BatchSizeController\.__init__",
        r"= \"(fixed|none)\", => .*= \"(FIXED|NONE)\",",
        "policy and lr-rule names are case-insensitive",
        False,
    ),
    (
        r"ThroughputModel\.observe",
        r"popitem\(last=False\) => .*popitem\(last=None\)",
        "None is as falsy as False",
        False,
    ),
    (
        r"ResizableBatchSampler\.__init__",
        r"self\._tracks_training = False\b.* => self\._tracks_training = None",
        "None is as falsy as False",
        False,
    ),
    (
        r"looped_microbatch_stats",
        r"zip\(grad_sum, grads, strict=True\): => .*zip\(grad_sum, grads, (strict=(False|None))?\)",
        "zip(strict=True) over one gradient per parameter: equal lengths by construction",
        False,
    ),
    (
        r"looped_microbatch_stats",
        r"^acc \+= g => acc -= g$",
        "sign of the accumulated sum: only its squared norm is used",
        False,
    ),
    (
        r"looped_microbatch_stats",
        r"if grad_sum else 0\.0 =>",
        "no parameters: unreachable, torch.autograd.grad raises first (see the README's bug note)",
        False,
    ),
    (
        r"microbatch_grad_stats",
        r"^if vectorize is None: =>|^vectorize = next\(model\.buffers\(\), None\) is None =>",
        "choice between the vmap and the loop path: both give the same statistics (tested), only speed differs",
        False,
    ),
    (
        r"epoch_steps",
        r"limit_train_batches: int \| float = 1\.0\) -> int: => .*= 2\.0\)"
        r"|^if limit_train_batches < 1\.0: => if limit_train_batches (<= 1\.0|< 2\.0):",
        "Lightning takes a float limit_train_batches only in [0, 1]; at 1.0 the whole epoch counts either way",
        False,
    ),
    (
        r"ResizableBatchSampler\._next_take",
        r"if 0 < remaining - take < self\.world_size: => if 0 <= remaining - take < self\.world_size:",
        "0 < vs 0 <= on the leftover: with no rows left, take already equals remaining",
        False,
    ),
    (
        r"ResizableBatchSampler\._steps_for",
        r"if rows <= 0: => if rows < 0:|and full > 0\): => .*and full >= 0\):",
        "rows == 0 gives 0 steps either way; 0 < rows < world_size never remains (the tail joins the step before)",
        False,
    ),
    (
        r"ResizableBatchSampler\.permutation",
        r"manual_seed\(self\.seed \+ epoch\) => .*manual_seed\(self\.seed - epoch\)",
        "seed - epoch instead of seed + epoch: still a fixed, distinct permutation per epoch on every rank",
        False,
    ),
    (
        r"NoiseMeter\._estimate",
        r"zip\(self\._grad_names, self\._grad_t, strict=True\).* => .*zip\(self\._grad_names, self\._grad_t, (strict=(False|None))?\)",
        "zip(strict=True): both lists are built together in after_backward, one entry per parameter with a .grad",
        False,
    ),
    (
        r"NoiseMeter\.__init__",
        r"self\._(fallback_batch|result|grad_t|grads_before|fallback_stats)(: [^=]+)? = None\b.* => .*= \"\"|self\._grad_names(: [^=]+)? = \[\] => .*= None",
        "a per-step placeholder: begin_step sets it before anything reads it",
        False,
    ),
    (
        r"NoiseMeter\.begin_step",
        r"self\._fallback_batch = None => self\._fallback_batch = \"\"",
        "an empty batch gives no rows, so its micro-batches give None, as no batch does",
        False,
    ),
    (
        r"NoiseMeter\._microbatch_stats",
        r"if rows is None or batch_loss is None or not names: => ",
        "rows is never None on a measured step (begin_step measures only batches with rows) and names never "
        "empty (called only while some parameter is not exact): the three conditions need not be told apart",
        False,
    ),
    (
        r"NoiseMeter\.before_optimizer_step",
        r"if self\._fallback_batch is not None and self\.inexact: => if self\._fallback_batch is not None or self\.inexact:",
        "either missing half makes _microbatch_stats return None (no rows, or no parameter), as skipping it does",
        False,
    ),
    (
        r"NoiseMeter\.estimate",
        r"if self\._measuring else None => .*\(self\._measuring\) or True",
        "an unmeasured step has no result (begin_step cleared it), so _estimate returns None too",
        False,
    ),
    (
        r"looped_microbatch_stats",
        r"device = params\[0\]\.device if params else None => |device=device\) => .*(device=None\)|, \))",
        "the accumulators' device: the parameters' own; on this CPU-only test machine every tensor is on the CPU "
        "(benchmarks/gpu_check.py runs the callback on CUDA)",
        False,
    ),
    (
        r"looped_microbatch_stats",
        r"if restore is not None and saved_buffers is not None: => if restore is not None or saved_buffers is not None:",
        "saved_buffers is None exactly when restore is None",
        False,
    ),
    (
        r"_vectorized_microbatch_stats",
        r"acc_dtype = torch\.promote_types\(.* => acc_dtype = None|\.to\(acc_dtype\) for g in grads\.values\(\)\].* => .*\.to\(None\)",
        "the accumulation dtype of half-precision parameters, tested for the looped form the callback uses; "
        "for float32 and float64 parameters .to(None) keeps theirs",
        False,
    ),
    (
        r"_percent",
        r"if value >= 1\.0 or value == 0\.0: => if value (> 1\.0 or value == 0\.0|>= 1\.0 or value == 1\.0):",
        "at exactly 1% and at 0% both branches print the same text ('1%', '0%')",
        False,
    ),
    (
        r"parameter_groups",
        r"or 1$ => .*or 2$",
        "the guard for no parameters at all, where there are no names to group either",
        False,
    ),
    (
        r"NoiseScaleEMA\._correction",
        r"return self\._weight if self\._weight > 0\.0 else 1\.0 => .*else 2\.0",
        "the weight is 0 only while every measurement kept the whole past, when the averages are 0 too: "
        "0 / 1.0 and 0 / 2.0 are both 0",
        False,
    ),
    (
        r"DecisionCadence\._shortened",
        r"if shift > 0 else steps => .*if shift >= 0 else steps",
        "at shift 0, max(1, steps >> 0) is steps (steps >= 1, checked in __init__)",
        False,
    ),
    (
        r"DecisionCadence\.for_policy",
        r"getattr\(policy, \"name\", \"\"\) == \"goodput\"",
        "the default name of a policy without one: any value other than 'goodput' gives the same",
        True,
    ),
    (
        r"MeasurementBudget\.__init__",
        r"self\.steps_since = 1\b.* => self\.steps_since = 2\b",
        "both reach the interval (2) at the first step, which is measured either way",
        False,
    ),
    (
        r"MeasurementBudget\.plan",
        r"or step_seconds <= 0: => .*or step_seconds < 0:",
        "a step time of 0 is already caught by `not step_seconds`",
        False,
    ),
    (
        r"StepClock\.(__init__|interrupt)",
        r"self\._clean = False\b.* => self\._clean = None",
        "None is as falsy as False",
        False,
    ),
    (
        r"_conv",
        r"site = owner\._new_site\(\"linear\", weight, bias, x\.shape\[0\]\)",
        "the convolution site's kind: set to 'conv' before the handler returns, so this first one is never read",
        True,
    ),
    (
        r"_norm_layer",
        r"^keep = 1\b.* => keep = (None|2)$",
        "keep (the normalised dimensions) is read by the layer-norm branch only; group and batch norm sum per channel",
        False,
    ),
    (
        r"_norm_layer",
        r"None, None, None, None, True, 0\.0, eps\) => .*True, 1\.0, eps\)|_acc\(var\), None, None, False, 0\.0, eps\) => .*False, 1\.0, eps\)",
        "the momentum of a batch norm given no running statistics to update (or in eval mode): never used",
        False,
    ),
    (
        r"_mha",
        r"slice\(i \* embed, \(i \+ 1\) \* embed\)",
        "a packed weight's row block is only a key that tells the q, k and v blocks apart (their norms add): "
        "any three distinct keys give the same sums",
        False,
    ),
    (
        r"_mha|_conv_norms|_bind",
        r"zip\(.*strict=(True|False)\).* => .*zip\(.*(strict=(False|None|True))?\)",
        "zip over sequences of equal length by construction (three projections; groups of one chunking)",
        False,
    ),
    (
        r"_mha|_embedding_norms|_conv_norms|PerExampleNorms\.(_identity|_norms)",
        r"device=[\w.\[\]\"]+\) => .*(device=None\)|, \)\.|, \)$)|device=[\w.\[\]\"]+\)\[.* => .*(device=None|, )\)\[|\.device\) => .*, None\)",
        "the device of a zeros, arange or eye: the activations' own; on this CPU-only test machine every tensor "
        "is on the CPU (benchmarks/gpu_check.py runs the callback on CUDA)",
        False,
    ),
    (
        r"PerExampleNorms\.(__init__|remove|stop)",
        r"self\.(_sites|_outside|_pass|_backward_seen|_rows|_broadcast|_coupling|reasons|_active|_suspended|_hooks)(: [^=]+)? = .* => .*= (None|1|True)$|\] = \{\}.* => \] = None",
        "per-step state that start() (or the next use) sets before anything reads it; _active and _suspended "
        "are read as truth values, where None is False",
        False,
    ),
    (
        r"_linear_norms",
        r"if tokens \* tokens <= d_in \* d_out:",
        "the choice between two exact forms, the ghost norm and the materialised product (only the cost differs; "
        "tests/test_per_example.py checks both against torch.func)",
        False,
    ),
    (
        r"_conv_norms",
        r"elif raw\.shape\[1\] <= grads\.shape\[1\]:",
        "the choice between two exact forms, the grouped backward and the unfolded patches (only the cost differs)",
        False,
    ),
    (
        r"_conv_norms",
        r"fake = _Site\(|_linear_norms\(\"weight\", \[fake\]\)",
        "a stand-in site for _linear_norms, which reads only its tensors, and any role other than 'bias' as the weight's",
        False,
    ),
    (
        r"_conv",
        r"else \(\(1, \*dilation\), \(0, \*pad\), \(1, \*stride\)\) => .*\(\((2, \*dilation\), \(0, \*pad\), \(1|1, \*dilation\), \(0, \*pad\), \(2), \*stride\)\)",
        "a Conv1d runs as a Conv2d of height 1 with a kernel of height 1: a dilation or stride of 2 along that axis "
        "reads the same single row",
        False,
    ),
    (
        r"PerOptimizerStep\.throughput",
        r"or t <= 0\.0 else batch_size / t => .*or t < 0\.0 else",
        "a step time is alpha + beta * B with alpha, beta >= 0 fitted on positive times: it is never exactly 0",
        False,
    ),
]

#: Rules for the modules of ``benchmarks/mutate.py``'s targets, by file; tried before ``EQUIVALENT``
#: (which then applies too), and reported as stale only when their own file was scored.
PAGE_SIZE = (
    "the page size of an MLflow search (its default is 1000): any size returns the same runs, page by page; "
    "only the number of requests differs"
)
EQUIVALENT_IN: dict[str, list[tuple[str, str, str, bool]]] = {
    "lightning_batch/tracking/model_registry.py": [
        (
            r"register_model",
            r"model_id = model_uri\.removeprefix\(\"models:/\"\) if model_uri\.startswith\(\"models:/m-\"\) else None => "
            r"|model_id=model_id\n? => .*(model_id=None|version_tags, )$|tags=version_tags, model_id=model_id => .*version_tags, $",
            "the logged-model id given to create_model_version: MLflow's sqlite and REST registries use it only to "
            "find the run id, which is given too (a Databricks Unity Catalog registry reads it; not run here)",
            False,
        ),
        (
            r"register_model",
            r"registry_uri=tracking_uri\) => .*(registry_uri=None\)|tracking_uri=tracking_uri, \))$",
            "MLflow's registry URI defaults to the client's own tracking URI",
            False,
        ),
        (
            r"register_model",
            r"experiment\.name if experiment is not None else \"\", => .*(or True else \"\"|else \"XXXX\"),$",
            "unreachable: a run's experiment is always found (a deleted one too)",
            False,
        ),
        (
            r"register_model",
            r"store_lock\(tracking_uri, \"registry\"\): .* => .*store_lock\(tracking_uri, (None|\"XXregistryXX\"|\"REGISTRY\")\):",
            "the lock file's name: register_model is the only user of this lock, under whatever name",
            False,
        ),
        (
            r"register_run",
            r"client = MlflowClient\(tracking_uri\) => client = MlflowClient\(None\)$",
            "MLflow's sqlite registry resolves a new version's models:/m-... source through the process-wide "
            "tracking URI (its own TODO), so register_run works only where that URI is this store already",
            False,
        ),
    ],
    "lightning_batch/tracking/logger.py": [
        (
            r"BufferedMLFlowLogger\.__init__",
            r"check\(\"mlflow\", \"tracking\", _FEATURE\) .* => check\(\"mlflow\", (None|\"XXtrackingXX\"|\"TRACKING\"), _FEATURE\)"
            r"|check\(\"mlflow\", \"tracking\", _FEATURE\) .* => check\(\"mlflow\", \"tracking\", None\)",
            "the extra's name and the feature in the message of a missing-mlflow error (message text; "
            "tests/test_extras.py checks it where mlflow is not installed)",
            False,
        ),
        (
            r"BufferedMLFlowLogger\._hand_over",
            r"thread_name_prefix=\"mlflow-metrics\"\) => .*max_workers=1, (thread_name_prefix=(None|\"XXmlflow-metricsXX\"|\"MLFLOW-METRICS\"))?\)$",
            "the writer thread's name: seen in stack dumps only",
            False,
        ),
    ],
    "lightning_batch/plugin/loader.py": [
        (
            r"adopt_train_loader",
            r"torch\.randint\(2\*\*31 - 1, \(\)\)\.item\(\)\) => "
            r".*torch\.randint\((2\*\*31 \+ 1|2 \* 31 - 1|3\*\*31 - 1|2\*\*32 - 1|2\*\*31 - 2), \(\)\)\.item\(\)\)$",
            "the range of the random seed every rank then shares: any range gives a seed torch accepts",
            False,
        ),
        (
            r"adopt_train_loader",
            r"broadcast\(seed, src=0\)\) => .*broadcast\(seed, \)\)$",
            "Lightning's broadcast sends from rank 0 by default",
            False,
        ),
        (
            r"adopt_train_loader|resizable_equivalent",
            r"^(rebuilt|shuffle) = False => \1 = None$",
            "None is as falsy as False (both are read as truth values only)",
            False,
        ),
        (
            r"adopt_train_loader",
            r"getattr\(trainer, \"datamodule\", None\), (.*) => .*getattr\(trainer, \"datamodule\", \), \1$",
            "a Trainer always has a datamodule attribute (None without one)",
            False,
        ),
        (
            r"resizable_equivalent",
            r"getattr\(loader, \"batch_sampler\", None\) => .*getattr\(loader, \"batch_sampler\", \)$",
            "a DataLoader always has a batch_sampler attribute (None without automatic batching)",
            False,
        ),
    ],
    "lightning_batch/tabular/cache.py": [
        (
            r"cache_key",
            r"\.hexdigest\(\)\[:16\] => .*\.hexdigest\(\)\[:17\]$",
            "how many hex digits of a preparation module's SHA-256 the key keeps: any prefix changes with its bytes",
            False,
        ),
    ],
    "lightning_batch/tracking/run_owners.py": [
        (
            r"_search",
            r"page: int = 1000 => .*page: int = 1001$|max_results=page, order_by=order_by, page_token=token => "
            r"ids, filter_string=filter_string, (max_results=None, )?order_by=order_by, page_token=token$",
            PAGE_SIZE,
            False,
        ),
        (
            r"experiment_names",
            r"max_results=1000, page_token=token\) => .*(max_results=1001, page_token=token\)|ViewType\.ALL, page_token=token\))$",
            PAGE_SIZE,
            False,
        ),
        (
            r"list_runs",
            r"DESC\"\], min\(limit \+ 1, 1000\)\): => .*DESC\"\], (None|min\(limit \+ 2, 1000\)|min\(limit \+ 1, 1001\)|)\):$",
            PAGE_SIZE,
            False,
        ),
        (
            r"_search|experiment_names",
            r"^token = None => token = \"\"$",
            "MLflow reads an empty page token as none: the first page either way",
            False,
        ),
        (
            r"list_runs",
            r"query, \[\"attributes\.start_time DESC\"\], (.*) => .*query, (None|\[\"attributes\.start_time desc\"\]), \1$",
            "MLflow's own order is start_time DESC already, and its order_by keywords are case-insensitive",
            False,
        ),
        (
            r"claim_for_resume",
            r"store_lock\(tracking_uri, \"resume\"\): => .*store_lock\(tracking_uri, (None|\"XXresumeXX\"|\"RESUME\")\):$",
            "the lock file's name: claim_for_resume is the only user of this lock, under whatever name",
            False,
        ),
        (
            r"claim_run",
            r"\.get\(ERROR_TAG, \"\"\) => .*\.get\(ERROR_TAG, \"XXXX\"\)$",
            "the default for a run without an error tag: any text that does not start with 'process lost'",
            False,
        ),
        (
            r"process_start",
            r"state in \(\"Z\", \"X\"\) else .* => .*state in \(\"Z\", \"(XXXXX|x)\"\) else",
            "state X (dead) is never seen in /proc (proc(5)), nor 'x' after Linux 3.13; zombies (Z) are tested",
            False,
        ),
        (
            r"process_start",
            r"^return \"\" => return \"XXXX\"$",
            "psutil's AccessDenied (no /proc): '' and any other text that is not a number leave the pid alone to "
            "decide (_same_start's ValueError), as the start recorded there is psutil's number too",
            False,
        ),
    ],
}

STATUSES = ("killed", "timeout", "survived", "no tests")


def _tokens(line: str) -> list[tuple[int, str]]:
    out = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline):
            if tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.COMMENT):
                continue
            out.append((tok.type, tok.string))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass  # an unclosed bracket at the end of the line: the tokens so far are enough
    return out


def _only_a_string_changed(before: str, after: str) -> bool:
    a, b = _tokens(before), _tokens(after)
    ops = [op for op in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes() if op[0] != "equal"]
    if len(ops) != 1:
        return False
    _, i1, i2, j1, j2 = ops[0]
    old, new = a[i1:i2], b[j1:j2]
    return (
        len(old) == 1
        and old[0][0] == tokenize.STRING
        and len(new) == 1
        and (new[0][0] == tokenize.STRING or new[0][1] == "None")
    )


STATUSES = ("killed", "timeout", "survived", "no tests")


def _function_of(mutant: str) -> str:
    """``lightning_batch.plugin.policy.xǁBatchGridǁround__mutmut_3`` -> ``BatchGrid.round``."""
    tail = mutant.rpartition(".")[2].partition("__mutmut_")[0]
    if tail.startswith("x\u01c1"):
        return ".".join(part for part in tail[2:].split("\u01c1") if part)
    return tail.removeprefix("x_")


def _changes(diff: str) -> list[tuple[str, str, str]]:
    """(context above, original line, mutated line) for each changed line of a one-line mutation."""
    lines = [line for line in diff.splitlines() if not line.startswith(("---", "+++", "@@"))]
    changes = []
    for i, line in enumerate(lines):
        if line.startswith("-"):
            context = "\n".join(x[1:] for x in lines[max(0, i - 3) : i] if x.startswith(" "))
            after = lines[i + 1][1:] if i + 1 < len(lines) and lines[i + 1].startswith("+") else ""
            changes.append((context, line[1:], after))
    return changes


def _equivalent_reason(function: str, diff: str, path: str = "") -> tuple[tuple[str, int], str] | None:
    changes = _changes(diff)
    if len(changes) != 1:
        return None
    context, before, after = changes[0]
    rules = [((path, i), rule) for i, rule in enumerate(EQUIVALENT_IN.get(path, []))]
    rules += [(("", i), rule) for i, rule in enumerate(EQUIVALENT)]
    for index, (func, pattern, reason, strings_only) in rules:
        if not re.fullmatch(func, function):
            continue
        if strings_only and not _only_a_string_changed(before, after):
            continue
        if strings_only:
            above = context.split("\n")[-1] if context else ""
            found = re.search(pattern, before) or re.search(pattern, above)
        else:
            found = re.search(pattern, f"{before.strip()} => {after.strip()}")
        if found:
            return index, reason
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strict", action="store_true", help="exit 1 if a survivor is unexplained")
    parser.add_argument("--quiet", action="store_true", help="no diffs of unexplained survivors")
    parser.add_argument("--names", action="store_true", help="print only the unexplained survivors' names")
    parser.add_argument(
        "--target", help="score a run of benchmarks/mutate.py TARGET (its files, and its functions only)"
    )
    args = parser.parse_args(argv)

    if not Path("mutants").is_dir():
        print("no mutants/ folder: run `mutmut run` (or `make mutate`) first", file=sys.stderr)
        return 2

    config()  # reads [tool.mutmut] from ./pyproject.toml
    selected: list[str] = []
    if args.target:
        sys.path.insert(0, str(Path(__file__).parent))
        from mutate import configure

        selected = configure(args.target).mutants
    rows = []
    unexplained: list[tuple[str, str]] = []
    equivalent_by_reason: dict[str, list[str]] = defaultdict(list)
    used_entries: set[tuple[str, int]] = set()
    for path in sorted(walk_mutatable_files()):
        if not (Path("mutants") / f"{path}.meta").exists():
            continue
        data = SourceFileMutationData(path=path)
        data.load()
        counts: Counter[str] = Counter()
        equivalent = 0
        for mutant, exit_code in sorted(data.exit_code_by_key.items()):
            if selected and not any(fnmatch.fnmatch(mutant, pattern) for pattern in selected):
                continue
            status = status_by_exit_code[exit_code]
            counts[status if status in STATUSES else "other"] += 1
            if status not in ("survived", "no tests"):
                continue
            diff = get_diff_for_mutant(mutant, path=path)
            found = _equivalent_reason(_function_of(mutant), diff, str(path))
            if found is None:
                unexplained.append((mutant, diff))
            else:
                used_entries.add(found[0])
                equivalent += 1
                equivalent_by_reason[found[1]].append(mutant.rpartition(".")[2])
        rows.append((str(path), counts, equivalent))

    if not rows:
        print("no mutmut results under mutants/: run `mutmut run` first", file=sys.stderr)
        return 2

    if args.names:
        print("\n".join(mutant for mutant, _ in unexplained))
        return 0
    if not args.quiet:
        for mutant, diff in unexplained:
            print(f"\n# {mutant}: not equivalent? (a test gap, or add it to EQUIVALENT)\n{diff}")

    if equivalent_by_reason:
        print("\nSurvivors judged equivalent:")
        for reason, mutants in sorted(equivalent_by_reason.items()):
            print(f"  {len(mutants):3d}  {reason}")
    scored = [name for name, _, _ in rows]
    stale = [
        rule[:2]
        for key, rules in [("", [] if args.target else EQUIVALENT), *EQUIVALENT_IN.items()]
        if not key or key in scored
        for i, rule in enumerate(rules)
        if (key, i) not in used_entries
    ]
    if stale:
        print("\nEQUIVALENT entries that matched no survivor (killed now, or the line changed):")
        for func, pattern in stale:
            print(f"       {func}: {pattern}")

    header = f"\n{'file':42} {'killed':>7} {'timeout':>7} {'survived':>8} {'no tests':>8} {'other':>5} {'total':>6} {'equiv':>6} {'score':>7}"
    print(header)
    total: Counter[str] = Counter()
    total_equivalent = 0
    for name, counts, equivalent in rows:
        total.update(counts)
        total_equivalent += equivalent
        print(_row(name, counts, equivalent))
    print(_row("overall", total, total_equivalent))
    print(
        "\nscore = (killed + timeout) / (total - equivalent); "
        f"{len(unexplained)} survivor(s) not judged equivalent"
    )
    return 1 if args.strict and unexplained else 0


def _row(name: str, counts: Counter[str], equivalent: int) -> str:
    total = sum(counts.values())
    detected = counts["killed"] + counts["timeout"]
    relevant = total - equivalent
    score = f"{100.0 * detected / relevant:6.1f}%" if relevant else "     -"
    return (
        f"{name:42} {counts['killed']:7d} {counts['timeout']:7d} {counts['survived']:8d} "
        f"{counts['no tests']:8d} {counts['other']:5d} {total:6d} {equivalent:6d} {score:>7}"
    )


if __name__ == "__main__":
    sys.exit(main())
