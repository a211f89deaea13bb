"""Converters from the layouts of the datasets ProRL trained on to the one task format
(files.py): `prorl convert FORMAT INPUT OUTPUT`.

  deepscaler   DeepScaleR-Preview math: JSON array or JSONL of {problem, answer, solution}
  eurus        Eurus-2-RL-Data (Parquet or JSONL): {data_source, prompt: [{role, content}],
               ability: "code" | "math", reward_model: {ground_truth, style}, extra_info};
               a code ground_truth is the JSON text of APPS/TACO tests, {"inputs": [stdin],
               "outputs": [stdout]} or {"fn_name", "inputs": [[args]], "outputs": [[value]]}
  scp116k      SCP-116K STEM (JSONL, JSON array or Parquet): {domain, problem,
               matched_solution, extract_solution}; the short answer is the final answer of
               the solution (\\boxed{} or an "answer is" line)
  nemotron-if  Llama-Nemotron instruction following (JSONL): {input: [{role, content}],
               args: {instruction_id_list: [IFEval ids], instruction_kwargs: [{...}]}}

Every converted row is checked exactly as the loader checks it. A row that cannot be
converted is reported with its file and row and left out (or, with strict=True, stops the
conversion).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from prorl_actors.tasks.answers import final_answer
from prorl_actors.tasks.families import make_families
from prorl_actors.tasks.files import DataError, check_row, read_records, write_rows


@dataclass
class Converted:
    rows: list[dict] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)   # "file:row N: why"


def _text(rec: dict, key: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str) or not v.strip():
        raise DataError(f"{key} must be a non-empty string")
    return v.strip()


def _last_user(messages, key: str) -> str:
    if isinstance(messages, str) and messages.strip():
        return messages.strip()
    if not isinstance(messages, list):
        raise DataError(f"{key} must be a list of chat messages")
    users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users or not isinstance(users[-1], str) or not users[-1].strip():
        raise DataError(f"{key} has no user message")
    return users[-1].strip()


# ------------------------------------------------------------------------------------ math
def deepscaler_row(rec: dict) -> dict:
    answer = rec.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise DataError("answer must be a non-empty string")
    meta = {"source": "deepscaler"}
    if isinstance(rec.get("solution"), str):
        meta["solution"] = rec["solution"]
    return {"task": "math", "prompt": _text(rec, "problem"), "reference": {"answer": answer.strip()},
            "metadata": meta}


# ------------------------------------------------------------------------------------ code
def _io_text(v, what: str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(x, str) for x in v):   # some rows give lines
        return "\n".join(v) + "\n"
    raise DataError(f"{what} must be a string (or a list of lines), got {type(v).__name__}")


def apps_tests(ground_truth) -> list[dict]:
    """APPS/TACO tests -> sandbox tests. Call-based outputs are wrapped in a one-element list
    by APPS's convention ([[value]]): the value is the element."""
    gt = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    if not isinstance(gt, dict):
        raise DataError("ground_truth must be a JSON object of tests")
    inputs, outputs = gt.get("inputs"), gt.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs) or not inputs:
        raise DataError("ground_truth needs equally long, non-empty inputs and outputs")
    fn = gt.get("fn_name")
    if fn:
        tests = []
        for i, (args, out) in enumerate(zip(inputs, outputs)):
            if not isinstance(args, list):
                raise DataError(f"ground_truth.inputs[{i}] must be a list of arguments")
            expected = out[0] if isinstance(out, list) and len(out) == 1 else out
            tests.append({"kind": "call", "fn": str(fn), "args": args, "expected": expected})
        return tests
    return [{"kind": "stdio", "stdin": _io_text(i, f"ground_truth.inputs[{k}]"),
             "stdout": _io_text(o, f"ground_truth.outputs[{k}]")} for k, (i, o) in enumerate(zip(inputs, outputs))]


def eurus_row(rec: dict) -> dict:
    prompt = _last_user(rec.get("prompt"), "prompt")
    rm = rec.get("reward_model")
    if not isinstance(rm, dict) or "ground_truth" not in rm:
        raise DataError("reward_model.ground_truth is missing")
    meta = {"source": "eurus-2-rl", "data_source": rec.get("data_source")}
    ability = rec.get("ability")
    if ability == "code":
        try:
            tests = apps_tests(rm["ground_truth"])
        except json.JSONDecodeError as e:
            raise DataError(f"reward_model.ground_truth is not JSON: {e.msg}") from None
        return {"task": "code", "prompt": prompt, "reference": {"tests": tests}, "metadata": meta}
    if ability == "math":
        gt = rm["ground_truth"]
        if not isinstance(gt, str) or not gt.strip():
            raise DataError("a math reward_model.ground_truth must be a non-empty string")
        return {"task": "math", "prompt": prompt, "reference": {"answer": gt.strip()}, "metadata": meta}
    raise DataError(f"ability {ability!r} is neither 'code' nor 'math'")


# ------------------------------------------------------------------------------------ stem
def scp116k_row(rec: dict) -> dict:
    problem = _text(rec, "problem")
    answer = None
    for key in ("matched_solution", "extract_solution"):
        if isinstance(rec.get(key), str):
            answer = final_answer(rec[key])
            if answer:
                break
    if not answer:
        raise DataError("no final answer (\\boxed{} or an 'answer is' line) in matched_solution or extract_solution")
    return {"task": "stem", "prompt": problem, "reference": {"answer": answer},
            "metadata": {"source": "scp-116k", "domain": rec.get("domain")}}


# ------------------------------------------------------------------------------------ ifeval
def _rel(v) -> str:
    if v not in ("less than", "at least", "at most", "exactly"):
        raise DataError(f"relation {v!r} is not one IFEval uses")
    return v


# IFEval instruction id -> function of its kwargs giving our instruction
IFEVAL_IDS: dict[str, Callable[[dict], dict]] = {
    "keywords:existence": lambda k: {"kind": "keywords_include", "keywords": k["keywords"]},
    "keywords:forbidden_words": lambda k: {"kind": "keywords_exclude", "keywords": k["forbidden_words"]},
    "keywords:frequency": lambda k: {"kind": "keyword_frequency", "keyword": k["keyword"],
                                     "relation": _rel(k["relation"]), "num": k["frequency"]},
    "keywords:letter_frequency": lambda k: {"kind": "letter_frequency", "letter": k["letter"],
                                            "relation": _rel(k["let_relation"]), "num": k["let_frequency"]},
    "length_constraints:number_words": lambda k: {"kind": "word_count", "relation": _rel(k["relation"]),
                                                  "num": k["num_words"]},
    "length_constraints:number_sentences": lambda k: {"kind": "sentence_count", "relation": _rel(k["relation"]),
                                                      "num": k["num_sentences"]},
    "length_constraints:number_paragraphs": lambda k: {"kind": "paragraph_count", "relation": "exactly",
                                                       "num": k["num_paragraphs"]},
    "length_constraints:nth_paragraph_first_word": lambda k: {
        "kind": "nth_paragraph_first_word", "num": k["num_paragraphs"], "nth": k["nth_paragraph"],
        "first_word": k["first_word"]},
    "detectable_content:number_placeholders": lambda k: {"kind": "placeholders", "num": k["num_placeholders"]},
    "detectable_content:postscript": lambda k: {"kind": "postscript", "marker": k["postscript_marker"]},
    "detectable_format:number_bullet_lists": lambda k: {"kind": "bullet_count", "num": k["num_bullets"]},
    "detectable_format:number_highlighted_sections": lambda k: {"kind": "highlighted_sections",
                                                                "num": k["num_highlights"]},
    "detectable_format:multiple_sections": lambda k: {"kind": "numbered_sections", "marker": k["section_spliter"],
                                                      "num": k["num_sections"]},
    "detectable_format:json_format": lambda k: {"kind": "json_format"},
    "detectable_format:title": lambda k: {"kind": "title"},
    "detectable_format:constrained_response": lambda k: {"kind": "constrained_response"},
    "combination:two_responses": lambda k: {"kind": "two_responses"},
    "combination:repeat_prompt": lambda k: {"kind": "start_phrase", "phrase": k["prompt_to_repeat"]},
    "startend:end_checker": lambda k: {"kind": "end_phrase", "phrase": k["end_phrase"]},
    "startend:quotation": lambda k: {"kind": "quotation"},
    "change_case:capital_word_frequency": lambda k: {"kind": "capital_word_frequency",
                                                     "relation": _rel(k["capital_relation"]),
                                                     "num": k["capital_frequency"]},
    "change_case:english_capital": lambda k: {"kind": "uppercase"},
    "change_case:english_lowercase": lambda k: {"kind": "lowercase"},
    "punctuation:no_comma": lambda k: {"kind": "no_commas"},
}


def nemotron_if_row(rec: dict) -> dict:
    prompt = _last_user(rec.get("input"), "input")
    args = rec.get("args")
    if not isinstance(args, dict):
        raise DataError("args must be an object with instruction_id_list and instruction_kwargs")
    ids, kwargs = args.get("instruction_id_list"), args.get("instruction_kwargs")
    if not isinstance(ids, list) or not ids or not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise DataError("args.instruction_id_list and args.instruction_kwargs must be equally long, non-empty lists")
    instructions = []
    for i, (iid, kw) in enumerate(zip(ids, kwargs)):
        if iid not in IFEVAL_IDS:
            raise DataError(f"instruction {iid!r} has no verifier here (supported: {len(IFEVAL_IDS)} IFEval ids)")
        kw = {k: v for k, v in (kw or {}).items() if v is not None}
        try:
            instructions.append(IFEVAL_IDS[iid](kw))
        except KeyError as e:
            raise DataError(f"instruction_kwargs[{i}] ({iid}) lacks {e}") from None
    return {"task": "ifeval", "prompt": prompt, "reference": {"instructions": instructions},
            "metadata": {"source": "llama-nemotron-if", "instruction_ids": ids}}


FORMATS: dict[str, Callable[[dict], dict]] = {
    "deepscaler": deepscaler_row, "eurus": eurus_row, "scp116k": scp116k_row, "nemotron-if": nemotron_if_row}


def convert(fmt: str, src: str | Path, strict: bool = False) -> Converted:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    src, families, out = Path(src), make_families(), Converted()
    for label, rec in read_records(src):
        try:
            if isinstance(rec, Exception):
                raise rec
            if not isinstance(rec, dict):
                raise DataError(f"a record must be an object, got {type(rec).__name__}")
            row = FORMATS[fmt](rec)
            row["reference"] = json.dumps(row["reference"], ensure_ascii=False)
            check_row(row, None, families)   # exactly what the loader will check
            out.rows.append(row)
        except (ValueError, TypeError) as e:
            where = f"{src}:{label}: {e}"
            if strict:
                raise DataError(where) from None
            out.rejected.append(where)
    return out


def convert_file(fmt: str, src: str | Path, dst: str | Path, strict: bool = False, log=print) -> Converted:
    result = convert(fmt, src, strict)
    if not result.rows:
        raise DataError(f"{src}: no row could be converted ({len(result.rejected)} rejected)")
    write_rows(dst, result.rows)
    log(f"{fmt}: {len(result.rows)} rows -> {dst}; {len(result.rejected)} rejected")
    for why in result.rejected[:10]:
        log(f"  rejected {why}")
    if len(result.rejected) > 10:
        log(f"  ... and {len(result.rejected) - 10} more")
    return result
