"""download.sh against a fake copy of Meta's download server on 127.0.0.1.

The server holds a small file tree shaped like Meta's (LICENSE, USE_POLICY and, per model, a server
folder with consolidated.NN.pth, params.json, tokenizer.model and a correct checklist.chk). It checks
the signature in the query string like a presigned URL would, honours Range requests, and can be told
to refuse everything (403), send an HTML error page, cut a file short once, or serve corrupted bytes.
"""

import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "download.sh"
README = ROOT / "README.md"

SECRET = "SECRETSIG"
QUERY = f"Policy=abc&Signature={SECRET}&Key-Pair-Id=KP"

# name, local folder, server folder, shards: the facts of Meta's distribution the script must keep.
MODELS = [
    ("8B", "Meta-Llama-3-8B", "8b_pre_trained", 1),
    ("8B-instruct", "Meta-Llama-3-8B-Instruct", "8b_instruction_tuned", 1),
    ("70B", "Meta-Llama-3-70B", "70b_pre_trained", 8),
    ("70B-instruct", "Meta-Llama-3-70B-Instruct", "70b_instruction_tuned", 8),
]
SHARD_SIZE = 20_000

# Everything the script runs apart from the downloader and the md5 tool; the PATH tests link these.
BASE_TOOLS = ["bash", "cat", "head", "mkdir", "mv", "rm", "sleep", "tr"]


def md5(data):
    return hashlib.md5(data).hexdigest()


def make_tree():
    """{server path: bytes} for a fake release, and {local path: bytes} of what a download should give."""
    rng = random.Random(1234)
    server = {
        "LICENSE": b"FAKE LLAMA 3 COMMUNITY LICENSE\n",
        "USE_POLICY": b"FAKE ACCEPTABLE USE POLICY\n",
    }
    local = dict(server)
    for _, local_dir, remote_dir, shards in MODELS:
        files = {f"consolidated.{i:02d}.pth": rng.randbytes(SHARD_SIZE) for i in range(shards)}
        files["params.json"] = b'{"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 256}\n'
        files["tokenizer.model"] = rng.randbytes(300).hex().encode() + b"\n"
        files["checklist.chk"] = "".join(f"{md5(d)}  {n}\n" for n, d in files.items()).encode()
        for name, data in files.items():
            server[f"{remote_dir}/{name}"] = data
            local[f"{local_dir}/{name}"] = data
    return server, local


class FakeMeta:
    """What the fake server serves and what it was asked for."""

    def __init__(self):
        self.files, self.expected = make_tree()
        self.forbid_all = False
        self.html_for = set()      # server paths answered with a 200 HTML error page
        self.drop_once = set()     # server paths cut off halfway through on their first request
        self.drop_always = set()   # server paths cut off halfway through on every request
        self.corrupt = {}          # server path -> bytes sent instead of the real ones
        self.requests = []         # (server path, Range header or None)
        self.lock = threading.Lock()
        self.port = None

    def url(self):
        return f"http://127.0.0.1:{self.port}/*?{QUERY}"

    def requested_paths(self):
        with self.lock:
            return [path for path, _ in self.requests]


def make_handler(fake):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send_plain(self, status, body, content_type="text/plain"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            parsed = urllib.parse.urlsplit(self.path)
            path = urllib.parse.unquote(parsed.path).lstrip("/")
            with fake.lock:
                fake.requests.append((path, self.headers.get("Range")))
            query = urllib.parse.parse_qs(parsed.query)
            if fake.forbid_all or query.get("Signature") != [SECRET]:
                body = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code></Error>'
                return self.send_plain(403, body, "text/xml")
            if path in fake.html_for:
                body = b"<!DOCTYPE html><html><body><h1>Link expired</h1></body></html>"
                return self.send_plain(200, body, "text/html")
            if path not in fake.files:
                return self.send_plain(404, b"not found")
            data = fake.corrupt.get(path, fake.files[path])

            start = 0
            ranged = self.headers.get("Range")
            if ranged:
                match = re.fullmatch(r"bytes=(\d+)-", ranged.strip())
                assert match, f"unexpected Range header {ranged!r}"
                start = int(match.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            body = data[start:]
            self.send_response(206 if ranged else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            if ranged:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if self.command == "HEAD":
                return
            with fake.lock:
                drop = path in fake.drop_once or path in fake.drop_always
                fake.drop_once.discard(path)
            if drop:
                # Promise the whole file, send half, hang up: what a flaky connection looks like.
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@pytest.fixture
def server():
    fake = FakeMeta()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(fake))
    httpd.daemon_threads = True
    fake.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def run_script(*args, env=None, cwd=None, stdin=None, path=None):
    """Run download.sh; check on every run that the URL's signature never reaches the output."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("PRESIGNED_URL", "MODEL_SIZE", "TARGET_FOLDER", "CI")}
    full_env["DOWNLOAD_RETRY_DELAY"] = "0"
    full_env.update(env or {})
    if path is not None:
        full_env["PATH"] = str(path)
    proc = subprocess.run(
        [str(SCRIPT), *args], env=full_env, cwd=cwd, capture_output=True, text=True, timeout=50,
        input=stdin if stdin is not None else "",
    )
    assert SECRET not in proc.stdout and SECRET not in proc.stderr, "the URL's signature was printed"
    return proc


def env_for(server, target, models):
    return {"PRESIGNED_URL": server.url(), "MODEL_SIZE": models, "TARGET_FOLDER": str(target)}


def local_files(target):
    return {p.relative_to(target).as_posix(): p.read_bytes() for p in Path(target).rglob("*") if p.is_file()}


def expected_for(server, *local_dirs):
    return {k: v for k, v in server.expected.items()
            if "/" not in k or k.split("/")[0] in local_dirs}


def bin_dir(tmp_path, tools):
    """A directory of links to just `tools`, to serve as the whole PATH."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in tools:
        found = shutil.which(tool)
        assert found, f"the test machine lacks {tool}"
        (bindir / tool).symlink_to(found)
    return bindir


# ---------------------------------------------------------------------------------------------------
# Choosing models

def test_all_models_interactive_enter_means_all_into_current_directory(server, tmp_path):
    proc = run_script(cwd=tmp_path, stdin=f"{server.url()}\n\n")
    assert proc.returncode == 0, proc.stderr
    assert "Enter the URL from email:" in proc.stderr
    assert "Enter the list of models to download without spaces (8B,8B-instruct,70B,70B-instruct)" in proc.stderr
    assert local_files(tmp_path) == server.expected
    assert "Done: every file verified." in proc.stdout


def test_empty_model_size_means_all(server, tmp_path):
    proc = run_script(env=env_for(server, tmp_path / "w", ""))
    assert proc.returncode == 0, proc.stderr
    assert local_files(tmp_path / "w") == server.expected


def test_one_model(server, tmp_path):
    proc = run_script(env=env_for(server, tmp_path, "8B"))
    assert proc.returncode == 0, proc.stderr
    assert local_files(tmp_path) == expected_for(server, "Meta-Llama-3-8B")
    assert not [p for p in server.requested_paths() if p.startswith(("70b", "8b_instruction"))]


def test_model_names_are_case_insensitive_and_deduplicated(server, tmp_path):
    proc = run_script(env=env_for(server, tmp_path, "8b-INSTRUCT,70B-Instruct,8B-instruct"))
    assert proc.returncode == 0, proc.stderr
    assert local_files(tmp_path) == expected_for(server, "Meta-Llama-3-8B-Instruct", "Meta-Llama-3-70B-Instruct")
    assert server.requested_paths().count("8b_instruction_tuned/params.json") == 1


def test_interactive_one_model_creates_target_folder(server, tmp_path):
    target = tmp_path / "deep" / "weights"
    proc = run_script(env={"TARGET_FOLDER": str(target)}, stdin=f"{server.url()}\n70b\n")
    assert proc.returncode == 0, proc.stderr
    assert local_files(target) == expected_for(server, "Meta-Llama-3-70B")


def test_unknown_model_lists_the_valid_ones(server, tmp_path):
    proc = run_script(env=env_for(server, tmp_path / "w", "8B,13B"))
    assert proc.returncode == 2
    assert "Unknown model '13B'" in proc.stderr
    assert "8B,8B-instruct,70B,70B-instruct" in proc.stderr
    assert server.requested_paths() == []
    assert not (tmp_path / "w").exists()


def test_no_answer_on_stdin_is_an_error_not_a_hang(tmp_path):
    proc = run_script(cwd=tmp_path, stdin="")
    assert proc.returncode == 2
    assert "No URL given" in proc.stderr


def test_url_without_star_is_rejected_without_printing_it(server, tmp_path):
    url = server.url().replace("*", "LICENSE")
    proc = run_script(env={"PRESIGNED_URL": url, "MODEL_SIZE": "8B", "TARGET_FOLDER": str(tmp_path)})
    assert proc.returncode == 2
    assert "has no '*'" in proc.stderr
    assert server.requested_paths() == []


def test_help_explains_the_environment_variables():
    proc = run_script("--help")
    assert proc.returncode == 0
    for word in ["PRESIGNED_URL", "MODEL_SIZE", "TARGET_FOLDER", "checklist.chk", "Meta-Llama-3-70B-Instruct"]:
        assert word in proc.stdout


def test_unknown_argument_is_a_usage_error():
    proc = run_script("--fast")
    assert proc.returncode == 2
    assert "Unknown argument: --fast" in proc.stderr


# ---------------------------------------------------------------------------------------------------
# A link that no longer works

def test_403_says_the_link_expired_and_leaves_nothing_behind(server, tmp_path):
    server.forbid_all = True
    proc = run_script(env=env_for(server, tmp_path, "8B"))
    assert proc.returncode == 1
    assert "refused to send LICENSE (HTTP 403)" in proc.stderr
    assert "expired" in proc.stderr and "Request a new link" in proc.stderr
    assert f"http://127.0.0.1:{server.port}/" in proc.stderr  # the host helps spot a typo; the rest is hidden
    assert local_files(tmp_path) == {}


def test_mistyped_signature_gets_the_same_clear_message(server, tmp_path):
    env = env_for(server, tmp_path, "8B")
    env["PRESIGNED_URL"] = env["PRESIGNED_URL"].replace(SECRET, "SECRETSIX")
    proc = run_script(env=env)
    assert proc.returncode == 1
    assert "HTTP 403" in proc.stderr and "mistyped" in proc.stderr
    assert "SECRETSIX" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("path", ["8b_pre_trained/consolidated.00.pth", "8b_pre_trained/checklist.chk"])
def test_html_error_page_instead_of_a_file(server, tmp_path, path):
    server.html_for.add(path)
    proc = run_script(env=env_for(server, tmp_path, "8B"))
    assert proc.returncode == 1
    assert "expired" in proc.stderr
    name = path.split("/")[1]
    assert f"Meta-Llama-3-8B/{name}" in proc.stderr
    assert not (tmp_path / "Meta-Llama-3-8B" / name).exists()
    assert not (tmp_path / "Meta-Llama-3-8B" / f"{name}.part").exists()


# ---------------------------------------------------------------------------------------------------
# Interrupted downloads, corrupted files, second runs

@pytest.mark.parametrize("downloader", ["wget", "curl"])
def test_dropped_connection_resumes_to_the_right_md5(server, tmp_path, downloader):
    path = bin_dir(tmp_path, BASE_TOOLS + [downloader, "md5sum"])
    target = tmp_path / "w"
    server.drop_once.add("8b_pre_trained/consolidated.00.pth")
    proc = run_script(env=env_for(server, target, "8B"), path=path)
    assert proc.returncode == 0, proc.stderr
    assert f"with {downloader}" in proc.stdout
    assert "network error" in proc.stdout
    assert local_files(target) == expected_for(server, "Meta-Llama-3-8B")
    with server.lock:
        ranges = [r for p, r in server.requests if p == "8b_pre_trained/consolidated.00.pth"]
    assert ranges[0] in (None, "bytes=0-")
    assert ranges[-1] == f"bytes={SHARD_SIZE // 2}-"


def test_retries_are_bounded_and_keep_the_partial_file(server, tmp_path):
    server.drop_always.add("8b_pre_trained/consolidated.00.pth")
    env = env_for(server, tmp_path, "8B")
    env["DOWNLOAD_RETRIES"] = "3"
    proc = run_script(env=env)
    assert proc.returncode == 1
    assert "Downloading Meta-Llama-3-8B/consolidated.00.pth failed 3 times" in proc.stderr
    assert "Run the script again to continue" in proc.stderr
    assert server.requested_paths().count("8b_pre_trained/consolidated.00.pth") == 3
    # Each attempt got half of what was left: 1/2 + 1/4 + 1/8 of the file, kept for the next run.
    shard = server.files["8b_pre_trained/consolidated.00.pth"]
    kept = (tmp_path / "Meta-Llama-3-8B" / "consolidated.00.pth").read_bytes()
    assert kept == shard[: SHARD_SIZE - SHARD_SIZE // 8]


def test_file_missing_from_the_checklist_is_downloaded_with_a_warning(server, tmp_path):
    path = "8b_pre_trained/checklist.chk"
    server.files[path] = b"".join(l for l in server.files[path].splitlines(True) if b"tokenizer.model" not in l)
    proc = run_script(env=env_for(server, tmp_path, "8B"))
    assert proc.returncode == 0, proc.stderr
    assert "Meta-Llama-3-8B/tokenizer.model is not listed in checklist.chk" in proc.stderr
    assert (tmp_path / "Meta-Llama-3-8B" / "tokenizer.model").exists()


def test_partial_file_from_an_earlier_run_is_continued(server, tmp_path):
    shard = server.expected["Meta-Llama-3-8B/consolidated.00.pth"]
    (tmp_path / "Meta-Llama-3-8B").mkdir()
    (tmp_path / "Meta-Llama-3-8B" / "consolidated.00.pth").write_bytes(shard[:1234])
    proc = run_script(env=env_for(server, tmp_path, "8B"))
    assert proc.returncode == 0, proc.stderr
    assert local_files(tmp_path) == expected_for(server, "Meta-Llama-3-8B")
    with server.lock:
        assert ("8b_pre_trained/consolidated.00.pth", "bytes=1234-") in server.requests


def test_corrupted_file_is_reported_kept_and_fixed_by_the_next_run(server, tmp_path):
    bad = b'{"dim": 65}\n'
    server.corrupt["8b_pre_trained/params.json"] = bad
    proc = run_script(env=env_for(server, tmp_path, "8B,8B-instruct"))
    assert proc.returncode == 1
    assert "Meta-Llama-3-8B/params.json: checksum mismatch, kept as params.json.bad" in proc.stderr
    model = tmp_path / "Meta-Llama-3-8B"
    assert (model / "params.json.bad").read_bytes() == bad
    assert not (model / "params.json").exists()
    good = expected_for(server, "Meta-Llama-3-8B", "Meta-Llama-3-8B-Instruct")
    del good["Meta-Llama-3-8B/params.json"]
    good["Meta-Llama-3-8B/params.json.bad"] = bad
    assert local_files(tmp_path) == good  # everything else verified and is still there

    # The server is fixed; the next run fetches only what failed and keeps the .bad copy.
    del server.corrupt["8b_pre_trained/params.json"]
    with server.lock:
        server.requests.clear()
    proc = run_script(env=env_for(server, tmp_path, "8B,8B-instruct"))
    assert proc.returncode == 0, proc.stderr
    assert (model / "params.json").read_bytes() == server.files["8b_pre_trained/params.json"]
    assert (model / "params.json.bad").exists()
    assert sorted(server.requested_paths()) == [
        "8b_instruction_tuned/checklist.chk", "8b_pre_trained/checklist.chk", "8b_pre_trained/params.json"]


def test_complete_file_with_wrong_bytes_on_disk_is_not_trusted(server, tmp_path):
    model = tmp_path / "Meta-Llama-3-8B"
    model.mkdir()
    size = len(server.files["8b_pre_trained/tokenizer.model"])
    (model / "tokenizer.model").write_bytes(b"x" * size)  # right size, wrong bytes: nothing to resume
    proc = run_script(env=env_for(server, tmp_path, "8B"))
    assert proc.returncode == 1
    assert "Meta-Llama-3-8B/tokenizer.model: checksum mismatch" in proc.stderr
    assert (model / "tokenizer.model.bad").read_bytes() == b"x" * size
    assert (model / "consolidated.00.pth").read_bytes() == server.files["8b_pre_trained/consolidated.00.pth"]


def test_second_run_over_a_complete_folder_downloads_nothing(server, tmp_path):
    assert run_script(env=env_for(server, tmp_path, "")).returncode == 0
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()}
    with server.lock:
        server.requests.clear()
    time.sleep(0.01)  # so that a rewrite would show in the mtimes
    proc = run_script(env=env_for(server, tmp_path, ""))
    assert proc.returncode == 0, proc.stderr
    # Only the checklists, which say whether the files on disk are complete, are fetched again.
    assert sorted(server.requested_paths()) == sorted(f"{m[2]}/checklist.chk" for m in MODELS)
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()}
    assert {p for p in after if p.name != "checklist.chk"} == {p for p in before if p.name != "checklist.chk"}
    for p, stamp in before.items():
        if p.name != "checklist.chk":
            assert after[p] == stamp, f"{p} was rewritten"
    assert "Already downloaded and verified: Meta-Llama-3-70B/consolidated.07.pth" in proc.stdout


# ---------------------------------------------------------------------------------------------------
# Tools

def test_without_wget_or_curl_the_install_hint_is_shown(server, tmp_path):
    proc = run_script(env=env_for(server, tmp_path / "w", "8B"), path=bin_dir(tmp_path, BASE_TOOLS + ["md5sum"]))
    assert proc.returncode == 1
    assert "Neither wget nor curl" in proc.stderr
    assert "apt-get install wget" in proc.stderr and "brew install wget" in proc.stderr
    assert server.requested_paths() == []


def test_without_an_md5_tool_the_install_hint_is_shown(server, tmp_path):
    proc = run_script(env=env_for(server, tmp_path / "w", "8B"), path=bin_dir(tmp_path, BASE_TOOLS + ["wget"]))
    assert proc.returncode == 1
    assert "Neither md5sum nor md5" in proc.stderr
    assert "coreutils" in proc.stderr
    assert server.requested_paths() == []


def test_macos_md5_tool_verifies_for_real(server, tmp_path):
    """Without md5sum the script uses macOS's `md5 -q`; a stand-in for it must catch corruption too."""
    path = bin_dir(tmp_path, BASE_TOOLS + ["wget"])
    fake_md5 = path / "md5"
    fake_md5.write_text(
        f"#!{sys.executable}\n"
        "import hashlib, sys\n"
        "assert sys.argv[1:] == ['-q'], sys.argv\n"
        "print(hashlib.md5(sys.stdin.buffer.read()).hexdigest())\n"
    )
    fake_md5.chmod(0o755)
    server.corrupt["8b_pre_trained/tokenizer.model"] = b"not the tokenizer\n"
    proc = run_script(env=env_for(server, tmp_path / "w", "8B"), path=path)
    assert "verifying with md5" in proc.stdout
    assert proc.returncode == 1
    assert "Meta-Llama-3-8B/tokenizer.model: checksum mismatch" in proc.stderr
    assert "OK  Meta-Llama-3-8B/params.json" in proc.stdout


def test_shellcheck_is_clean():
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI"):
            pytest.fail("shellcheck is not installed, and CI must run it (apt-get install shellcheck)")
        pytest.skip("shellcheck is not installed (CI installs it)")
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------------
# README

def readme_section():
    text = README.read_text()
    match = re.search(r"^## Download the weights\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, "README.md has no '## Download the weights' section"
    return match.group(1)


def test_model_table_in_the_script_is_the_one_tested_here():
    block = re.search(r"^MODEL_TABLE='\n(.*?)^'", SCRIPT.read_text(), re.S | re.M).group(1)
    rows = [tuple(line.split()) for line in block.splitlines() if line.strip()]
    assert rows == [(n, l, r, str(s)) for n, l, r, s in MODELS]


def test_readme_matches_the_script():
    section = readme_section()
    script = SCRIPT.read_text()
    prompts = re.findall(r"printf '(Enter [^']*)'", script)
    assert len(prompts) == 2
    for prompt in prompts:
        prompt = prompt.replace("%s", "8B,8B-instruct,70B,70B-instruct").strip()
        assert prompt in section, f"README lacks the prompt {prompt!r}"
    assert "8B,8B-instruct,70B,70B-instruct" in section
    for _, local_dir, _, _ in MODELS:
        assert local_dir in section
    # The same environment variables, both ways.
    script_vars = set(re.findall(r"\$\{([A-Z][A-Z_]+):?[-+]", script)) - {"BASH_VERSION"}
    readme_vars = set(re.findall(r"`([A-Z][A-Z_]{3,})`", section)) - {"LICENSE", "USE_POLICY"}
    assert script_vars == readme_vars
    for phrase in [".bad", "--help", "checklist.chk", "md5sum", "wget", "curl"]:
        assert phrase in section
