"""
Tier 3: how the server is shipped: the Docker image (.dockerignore and
contrib/Dockerfile) and the systemd unit (contrib/signaling.service).

There is no Docker here, so the image's steps are replayed one by one: the
wheel is built from exactly the files .dockerignore lets into the build
context, installed into a fresh virtualenv, the Dockerfile's own plugin-cache
command is run as root, and twistd is started as ``nobody``, as in the image.
"""

import importlib.metadata
import json
import os
import posixpath
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import zipfile
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
from live import ServerProcess

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "contrib" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
UNIT = ROOT / "contrib" / "signaling.service"
CACHE_WARNING = "Unable to write to plugin cache"
PIP_TIMEOUT = 300  # a cold pip cache downloads setuptools, Twisted and the rest


def skip_or_fail(reason):
    """Elsewhere a skip; in CI (which runs as root, with setpriv) a failure."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


# -- .dockerignore --------------------------------------------------------------


def _pattern_regex(pattern):
    """A cleaned .dockerignore pattern as a regex, translated as moby's patternmatcher does."""
    out = ["^"]
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
            out.append(".*" if i == len(pattern) else "(.*/)?")
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c in ".+()|{}$":
            out.append("\\" + c)
        else:
            out.append(c)
        i += 1
    return re.compile("".join(out) + "$")


class DockerIgnore:
    """
    The rules of a .dockerignore, as Docker applies them (moby/patternmatcher):
    blank lines and lines starting with ``#`` are skipped; a pattern is cleaned
    (``posixpath.normpath``, leading ``/`` dropped); ``*`` and ``?`` do not
    match ``/``, ``**`` matches any number of directories; a pattern matches a
    path when it matches the path or one of its parent directories, and the
    last matching pattern decides (``!`` re-includes).

    Its limits: no backslash escapes; character classes go to ``re`` as they
    are (Go and ``re`` agree on ``[a-z]`` and ``[^a]``, not on every corner);
    ``^`` outside a class is not escaped; no Windows paths; directories are
    pruned from a walk by an fnmatch approximation of Docker's own test; and
    the Dockerfile and .dockerignore, which the builder reads whether or not
    they are excluded, are not special.
    """

    def __init__(self, text):
        self.patterns = []  # (cleaned pattern, regex, re-includes)
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            if include:
                line = line[1:].strip()
            pattern = posixpath.normpath(line)
            if len(pattern) > 1 and pattern.startswith("/"):
                pattern = pattern[1:]
            self.patterns.append((pattern, _pattern_regex(pattern), include))

    def excluded(self, path):
        parts = path.split("/")
        candidates = [path] + ["/".join(parts[: i + 1]) for i in range(len(parts) - 1)]
        excluded = False
        for _, rx, include in self.patterns:
            if any(rx.match(p) for p in candidates):
                excluded = not include
        return excluded

    def _may_reinclude_under(self, directory):
        """Whether a ``!`` pattern could re-include something under an excluded directory (else it is pruned)."""
        parts = directory.split("/")
        for pattern, _, include in self.patterns:
            comps = pattern.split("/")
            if include and ("**" in comps or len(comps) > len(parts) and all(
                    fnmatchcase(d, c) for d, c in zip(parts, comps))):
                return True
        return False

    def context(self, root):
        """The files under ``root`` that a ``docker build`` of it would send: relative paths."""
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            rel = "" if rel == "." else rel + "/"
            dirnames[:] = [d for d in dirnames
                           if not self.excluded(rel + d) or self._may_reinclude_under(rel + d)]
            files += [rel + f for f in filenames if not self.excluded(rel + f)]
        return sorted(files)


@pytest.fixture(scope="module")
def dockerignore():
    return DockerIgnore(DOCKERIGNORE.read_text())


def test_matcher_follows_docker_rules():
    """The matcher itself, on the rules the .dockerignore relies on."""
    rules = DockerIgnore("# comment\n*\n!/src/\n**/__pycache__\n*.md\n!keep.md\nsrc/*.tmp\n")
    assert rules.excluded("anything")
    assert rules.excluded(".git/objects/ab/cd")  # through its parent
    assert not rules.excluded("src/a.py")
    assert not rules.excluded("src/deep/er/b.py")
    assert rules.excluded("src/__pycache__/a.pyc")
    assert rules.excluded("src/deep/__pycache__/b.pyc")
    assert rules.excluded("other.md") and not rules.excluded("keep.md")
    assert rules.excluded("src/x.tmp")
    assert not rules.excluded("src/deep/x.tmp")  # * does not cross /


NEEDED = [
    "pyproject.toml", "setup.cfg", "README.rst", "LICENSE",
    "signaling/__init__.py", "signaling/tap.py", "signaling/static/signaling.js", "signaling/lua/route.lua",
    "twisted/plugins/signaling_plugin.py",
]

JUNK = [
    ".git/HEAD", ".git/objects/ab/cdef0123",
    ".tox/py/bin/python", ".tox/py/lib/python3.11/site-packages/twisted/__init__.py",
    ".venv/bin/python", "venv/bin/python", "env/lib/python3.11/site-packages/attr/__init__.py",
    "build/lib/signaling/web.py", "dist/signaling-0.1.0-py3-none-any.whl", "signaling.egg-info/PKG-INFO",
    ".hypothesis/examples/0123/4567", ".pytest_cache/v/cache/nodeids", ".mypy_cache/3.11/x.json",
    ".ruff_cache/CACHEDIR.TAG", ".coverage",
    "signaling/__pycache__/web.cpython-311.pyc", "signaling/web.pyc", "signaling/lua/__pycache__/x.pyc",
    "twisted/plugins/__pycache__/signaling_plugin.cpython-311.pyc", "twisted/plugins/dropin.cache",
    "tests/test_live.py", "bench/perf.py", "docs/perf.png", "docs/test-page-video-call.png",
    "signaling-resume.key", "twistd.pid", "twistd.log", ".env",
]


@pytest.mark.parametrize("path", JUNK)
def test_dockerignore_leaves_out(dockerignore, path):
    assert dockerignore.excluded(path)


@pytest.mark.parametrize("path", NEEDED)
def test_dockerignore_keeps_what_the_build_reads(dockerignore, path):
    assert not dockerignore.excluded(path)


def test_build_context_of_this_checkout_is_small(dockerignore):
    """The context ``docker build .`` would send from this very checkout, .tox and virtualenvs included."""
    files = dockerignore.context(ROOT)
    assert set(NEEDED) <= set(files)
    strays = [f for f in files if not f.startswith(("signaling/", "twisted/")) and f not in NEEDED]
    assert strays == []
    assert not [f for f in files if "__pycache__" in f or f.endswith((".pyc", "dropin.cache"))]
    size = sum(os.lstat(ROOT / f).st_size for f in files)
    assert size < 2_000_000, f"{len(files)} files, {size} bytes"


def _checkout_files():
    """The files of a clean checkout (tracked, or new and not ignored), relative paths."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        skip_or_fail("not a git checkout: cannot list its files")
    out = subprocess.run(
        [git, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True, timeout=60,
    ).stdout.decode()
    return sorted(f for f in set(out.split("\0")) if f and (ROOT / f).is_file())


def _build_wheel(files, workdir):
    """Copy ``files`` of the checkout into ``workdir``/src and build the wheel there, as the build stage does."""
    src, out = workdir / "src", workdir / "wheels"
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-input", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=PIP_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = sorted(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _wheel_contents(path):
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist()}


@pytest.fixture(scope="module")
def wheel(dockerignore, tmp_path_factory):
    """The wheel built from exactly the files of a clean checkout that .dockerignore lets through."""
    files = [f for f in _checkout_files() if not dockerignore.excluded(f)]
    return _build_wheel(files, tmp_path_factory.mktemp("context"))


def test_wheel_from_context_is_the_wheel_from_the_whole_tree(wheel, tmp_path):
    """Nothing the build reads is left out of the context: the wheel is the same as from the whole checkout."""
    reference = _build_wheel(_checkout_files(), tmp_path)
    assert wheel.name == reference.name
    ours, theirs = _wheel_contents(wheel), _wheel_contents(reference)
    assert sorted(ours) == sorted(theirs)
    assert [n for n in ours if ours[n] != theirs[n]] == []
    assert "twisted/plugins/signaling_plugin.py" in ours
    assert "signaling/static/signaling.js" in ours
    assert any(n.endswith(("/licenses/LICENSE", ".dist-info/LICENSE")) for n in ours)


# -- contrib/Dockerfile -------------------------------------------------------------


def _dockerfile_stages():
    """The Dockerfile's stages: [{"name": ..., "instructions": [(INSTRUCTION, arguments), ...]}]."""
    stages, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments and blank lines, also within continued lines
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        instruction, _, args = current.partition(" ")
        current = ""
        instruction, args = instruction.upper(), args.strip()
        if instruction == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?$", args, re.IGNORECASE)
            stages.append({"image": m.group(1), "name": m.group(2), "instructions": []})
        stages[-1]["instructions"].append((instruction, args))
    return stages


CACHE_COMMAND = re.compile(r"""python3?\s+-c\s+(["'])(.*?getPlugins.*?)\1""")


def cache_command():
    """The Python code the Dockerfile runs to write Twisted's plugin cache."""
    m = CACHE_COMMAND.search(DOCKERFILE.read_text())
    assert m, "the Dockerfile does not write Twisted's plugin cache (python -c ...getPlugins...)"
    return m.group(2)


def test_dockerfile_builds_a_wheel_then_installs_only_it():
    stages = _dockerfile_stages()
    assert len(stages) >= 2
    build, final = stages[0], stages[-1]
    assert build["name"], "the build stage is named, for COPY --from"
    runs = [args for instruction, args in build["instructions"] if instruction == "RUN"]
    wheel_runs = [r for r in runs if re.search(r"\bpip\s+wheel\b", r)]
    assert wheel_runs, runs
    assert "--no-deps" in wheel_runs[0]
    assert re.search(r"(-w|--wheel-dir)[ =]/wheels\b", wheel_runs[0])

    assert final["image"] == "python:3.11-slim"
    copies = [args for instruction, args in final["instructions"] if instruction in ("COPY", "ADD")]
    # the source tree stays in the build stage: the final one only takes the wheels
    assert copies and all(c.startswith(f"--from={build['name']} ") for c in copies), copies
    assert any(c.split()[1] == "/wheels" for c in copies), copies


def test_dockerfile_writes_the_plugin_cache_after_the_last_install_then_drops_root():
    final = _dockerfile_stages()[-1]["instructions"]
    # one string for the stage, to compare positions within and across RUNs
    text = "\n".join(f"{instruction} {args}" for instruction, args in final)
    installs = [m.start() for m in re.finditer(r"\bpip3?\s+install\b", text)]
    assert installs, "the final stage installs the wheel"
    assert re.search(r"\bpip3?\s+install\s+(--\S+\s+)*/wheels/\*\.whl", text)
    code = cache_command()
    assert "getPlugins(IPlugin)" in code
    cache_at = text.index(code)
    # a later install would leave the cache stale: it would be rebuilt, and fail, at every start
    assert max(installs) < cache_at
    users = [(m.start(), m.group(1)) for m in re.finditer(r"^USER (\S+)", text, re.MULTILINE)]
    assert users, "the image runs as a non-root user"
    user_at, user = users[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert cache_at < user_at, "the cache is written as root, before USER"
    # the state directory (the resume secret) belongs to that user
    assert re.search(rf"\bchown\s+(-\S+\s+)*{re.escape(user)}(:\S+)?\s+/state\b", text)
    assert ("WORKDIR", "/state") in final


def test_dockerfile_keeps_the_runtime_contract():
    text = DOCKERFILE.read_text()
    final = _dockerfile_stages()[-1]["instructions"]
    args = dict(final)
    assert set(args["EXPOSE"].split()) == {"3000", "8080"}
    assert args["STOPSIGNAL"] == "SIGTERM"
    cmd = json.loads(args["CMD"])  # the exec form: twistd is PID 1 and gets docker stop's SIGTERM
    assert cmd[:4] == ["twistd", "-n", "--pidfile=", "signaling"]
    assert "--http=tcp:3000" in cmd and "--ws=tcp:8080" in cmd
    assert "--resume-secret-file=/state/resume.key" in cmd
    # the usage comment still says to keep /state on a volume
    assert "-v signaling-state:/state" in text


# -- the image's steps, replayed without Docker -------------------------------------


def _as_nobody():
    """The command prefix that runs a command as nobody, with no supplementary groups."""
    if os.geteuid() != 0:
        skip_or_fail("running a command as nobody needs root")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        skip_or_fail("there is no user nobody")
    setpriv, runuser = shutil.which("setpriv"), shutil.which("runuser")
    if setpriv:
        return nobody, [setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
    if runuser:
        return nobody, [runuser, "-u", "nobody", "--"]
    skip_or_fail("neither setpriv nor runuser (util-linux) is installed")


def _python_for_nobody(as_nobody):
    """
    An interpreter nobody can run, to base the virtualenv on.  Not always this
    one: a pyenv Python under /root (mode 0700) is out of nobody's reach.
    """
    candidates = [getattr(sys, "_base_executable", sys.executable), sys.executable,
                  "/usr/bin/python3", "/usr/local/bin/python3"]
    for python in dict.fromkeys(os.path.realpath(c) for c in candidates if c and os.path.exists(c)):
        probe = subprocess.run(
            [*as_nobody, python, "-c", "import sys, venv; print(sys.version_info >= (3, 9))"],
            capture_output=True, text=True, timeout=60,
        )
        if probe.returncode == 0 and probe.stdout.strip() == "True":
            return python
    skip_or_fail("no Python >= 3.9 with venv that nobody can run")


def _pins(python, directory):
    """
    A constraints file: the versions of this environment (the ones the rest of
    the suite tests), when the virtualenv's Python is of the same minor version.
    """
    version = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    pins = {}
    if version == str(sys.version_info[:2]):
        for dist in importlib.metadata.distributions():
            name = re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower()
            if name and name != "signaling":
                pins.setdefault(name, f"{name}=={dist.version}")
    path = directory / "pins.txt"
    path.write_text("".join(line + "\n" for line in pins.values()))
    return path


class ImageServer(ServerProcess):
    """twistd -n signaling from the virtualenv, as nobody, in a state directory: the image's CMD."""

    def __init__(self, as_nobody, twistd, state):
        super().__init__(f"--resume-secret-file={state}/resume.key", cwd=str(state))
        self.as_nobody = as_nobody
        self.twistd = twistd

    def argv(self):
        return [*self.as_nobody, self.twistd, "-n", "--pidfile=", "signaling", *self.listen, *self.args]


def _run_image_server(image):
    """Start the server as nobody, wait until it is ready, stop it with SIGTERM: its log."""
    server = ImageServer(image["as_nobody"], str(image["bin"] / "twistd"), image["state"])
    try:
        server.start()
        server.signal(signal.SIGTERM)
        server.wait()
    finally:
        server.stop()
    return "\n".join(server.lines)


@pytest.fixture(scope="module")
def image(wheel):
    """
    The final stage, replayed: a virtualenv that only the wheel (and its
    dependencies) is installed into, by root, readable by nobody, and a state
    directory that belongs to nobody.
    """
    nobody, as_nobody = _as_nobody()
    python = _python_for_nobody(as_nobody)
    base = Path(tempfile.mkdtemp(prefix="signaling-image-"))
    try:
        os.chmod(base, 0o755)
        closed = [p for p in base.parents if not os.stat(p).st_mode & stat.S_IXOTH]
        if closed:
            skip_or_fail(f"nobody cannot reach {base}: {closed[0]} is not searchable by others")
        venv = base / "venv"
        subprocess.run([python, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-input", "-q",
             "-c", str(_pins(python, base)), str(wheel)],
            capture_output=True, text=True, timeout=PIP_TIMEOUT,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        where = "import os, twisted.plugins; print(os.path.dirname(twisted.plugins.__file__))"
        plugins = subprocess.run(
            [str(venv / "bin" / "python"), "-c", where], capture_output=True, text=True, check=True, timeout=60,
        ).stdout.strip()
        state = base / "state"
        state.mkdir(mode=0o700)
        os.chown(state, nobody.pw_uid, nobody.pw_gid)
        yield {"as_nobody": as_nobody, "bin": venv / "bin", "state": state, "cache": Path(plugins) / "dropin.cache",
               "version": wheel.name.split("-")[1]}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_plugin_cache_step_silences_the_warning_for_a_non_root_user(image):
    cache = image["cache"]
    assert not cache.exists(), "installing the wheel writes no plugin cache"

    # Without the Dockerfile's step: nobody cannot write the cache, and says so at every start.
    log = _run_image_server(image)
    assert CACHE_WARNING in log, log
    assert not cache.exists()

    # The step, run as root as in the image: the same command, taken from the Dockerfile.
    subprocess.run([str(image["bin"] / "python"), "-c", cache_command()], check=True, timeout=120)
    assert cache.exists()
    written = cache.stat().st_mtime_ns

    # Now nobody starts the server without a word about the cache, and leaves it alone.
    log = _run_image_server(image)
    assert CACHE_WARNING not in log, log
    assert f"signaling {image['version']} ready" in log, log
    assert cache.stat().st_mtime_ns == written

    # and twistd, as nobody, lists the plugin from the cache
    proc = subprocess.run([*image["as_nobody"], str(image["bin"] / "twistd"), "--help"],
                          cwd=image["state"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^\s+signaling\s", proc.stdout, re.MULTILINE), proc.stdout
    assert CACHE_WARNING not in proc.stdout + proc.stderr


# -- contrib/signaling.service ----------------------------------------------------


def _unit():
    """The unit's settings: {section: {key: [values]}}, continuation lines joined, comments dropped."""
    sections, section, current = {}, None, ""
    for line in UNIT.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith(("#", ";"))):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.startswith("[") and current.endswith("]"):
            section = sections.setdefault(current[1:-1], {})
        else:
            key, _, value = current.partition("=")
            section.setdefault(key.strip(), []).append(value.strip())
        current = ""
    return sections


def test_unit_runs_from_a_virtualenv_anywhere_and_keeps_its_state():
    service = _unit()["Service"]
    # yes (or tmpfs) hides /home and /root, and a virtualenv there with them
    assert service["ProtectHome"] == ["read-only"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["DynamicUser"] == ["yes"]
    assert service["StateDirectory"] == ["signaling"]
    assert service["WorkingDirectory"] == ["/var/lib/signaling"]
    (exec_start,) = service["ExecStart"]
    argv = exec_start.split()
    assert argv[0].endswith("/twistd")
    assert argv[1:4] == ["-n", "--pidfile=", "signaling"]
    assert "--resume-secret-file=/var/lib/signaling/resume.key" in argv
    assert service["KillSignal"] == ["SIGTERM"]
    assert "143" in service["SuccessExitStatus"][0].split()


def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        skip_or_fail("systemd-analyze is not installed (apt-get install systemd)")
    # verify checks that ExecStart's program exists: point it at one that does
    text = re.sub(r"^(ExecStart=[-@:+!]*)\S+", lambda m: m.group(1) + shutil.which("true"),
                  UNIT.read_text(), flags=re.MULTILINE)
    unit = tmp_path / "signaling.service"
    unit.write_text(text)
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if unit.name in line]
    assert proc.returncode == 0 and complaints == [], proc.stdout + proc.stderr
