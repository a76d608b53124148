"""`swa-rewrite demo` with the reference model: text in, text out."""

import json

from swa_rewrite.cli import main


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_demo_defaults_to_the_reference_model_with_text(capsys):
    code, out, _ = run(["demo", "--cpu", "--prompt", "def fibonacci(n):\n    ", "--prompt", "import o",
                        "--max-new-tokens", "4", "--json"], capsys)
    demo = json.loads(out)
    assert code == 0 and demo["model"]["name"].startswith("reference") and demo["model"]["num_layers"] == 6
    first, second = demo["prompts"]
    assert first["text"] == "def fibonacci(n):\n    " and first["length"] == len(first["text"]) + 1   # BOS
    assert second["text"] == "import o" and isinstance(second["original_text"], str)
    assert demo["graph_diff"]["changed_layers"] == [0, 2, 4]


def test_demo_prompts_come_from_held_out_files(capsys):
    code, out, _ = run(["demo", "--cpu", "--prompt-lens", "150", "9", "--max-new-tokens", "3"], capsys)
    assert code == 0 and "prompt 0 (150 bytes) ..." in out and "prompt 1 (9 bytes) " in out
    assert out.count("    original  ") == 2 and out.count("    rewritten ") == 2


def test_prompt_needs_the_byte_level_model(capsys):
    code, _, err = run(["demo", "--cpu", "--config", "tiny", "--prompt", "x"], capsys)
    assert code == 2 and "--prompt takes text for the byte-level reference model" in err
    code, _, err = run(["demo", "--cpu", "--layers", "3"], capsys)
    assert code == 2 and "--layers applies to the random configs" in err
