"""
GPT-2 token shards that others have made, downloaded from the Hugging Face hub instead of tokenized here:
`python fineweb.py --pretokenized NAME` (fineweb.py's other half, the one that takes minutes).

The files are llm.c's .bin shards (a 256-int32 header, then uint16 tokens), which train_gpt2.py reads as they
are. huggingface_hub does the transfers (HF_ENDPOINT, HF_TOKEN, retries, resuming a cut transfer) into a
hidden staging folder inside --out_dir; a shard takes its final name only once its header is checked
against its size, and the folder's progress file records each one's fingerprint, so a rerun fetches only
what is missing or damaged.
"""

import functools
import json
import os
import re
import shutil
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import huggingface_hub
import requests
from huggingface_hub import errors as hub_errors
from tqdm import tqdm

from machinery import common
from machinery.common import UserError

# name -> the hub dataset holding it; checked against modded-nanogpt's data/cached_fineweb10B.py and
# cached_finewebedu10B.py and llm.c's dev/data/edu_fineweb.sh (see the README for who made them)
SOURCES = {
    "fineweb-edu-10B": "kjj0/finewebedu10B-gpt2",  # finewebedu_val_000000.bin, _train_000001 ... 000103
    "fineweb-10B": "kjj0/fineweb10B-gpt2",  # fineweb_val_000000.bin, fineweb_train_000001 ... 000103
    "fineweb-edu-100B": "karpathy/fineweb-edu-100B-gpt2-token-shards",  # edu_fineweb_val_..., _train_ ... 001001
}
PROGRESS_NAME = "pretokenized_progress.json"  # which source the folder holds, and each shard's fingerprint
STAGING = ".download"  # hf_hub_download's local_dir: files wait here until they are checked
SHARD_RE = re.compile(r"^(.*/)?[^/]*_(val|train)_(\d+)\.bin$")

REACH_TIMEOUT = 15  # seconds for check_reachable's one request (a slow link still answers within it)


def default_out_dir(name):
    """The folder a download goes to by default: named after the table's name or the dataset id."""
    return name.split("/")[-1]


def check_reachable(repo_id):
    """One request, without retries: a hub that cannot be reached is said in one line at once, not after the
    client's retries (about 25 s and 11 lines of them). Any answer at all, an error status included, goes on
    to the real calls, which tell those apart."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return  # the client's own refusal says so (hub_failure)
    try:
        requests.head(huggingface_hub.constants.ENDPOINT, timeout=REACH_TIMEOUT, allow_redirects=False)
    except requests.RequestException as e:
        raise hub_failure(repo_id, None, e) from None


def remote_shards(repo_id, num_shards):
    """[(path in the repo, size)] of the val shard and the first num_shards train shards (None: all of them)."""
    check_reachable(repo_id)
    try:
        files = [(f.path, f.size) for f in huggingface_hub.list_repo_tree(repo_id, repo_type="dataset", recursive=True)
                 if isinstance(f, huggingface_hub.hf_api.RepoFile)]
    except Exception as e:
        raise hub_failure(repo_id, None, e) from None
    shards = {"val": [], "train": []}
    for path, size in files:
        if m := SHARD_RE.match(path):
            shards[m.group(2)].append((int(m.group(3)), path, size))
    if not shards["val"] or not shards["train"]:
        raise UserError(f"the hub dataset {repo_id} holds no llm.c shards (*_val_*.bin and *_train_*.bin); "
                        f"name one of {', '.join(SOURCES)}, or a dataset that holds such files")
    train = sorted(shards["train"])
    if num_shards is not None and num_shards > len(train):
        raise UserError(f"--num_shards {num_shards}: {repo_id} holds {len(train)} train shards; pass at most that")
    chosen = sorted(shards["val"])[:1] + train[:num_shards]
    return [(path, size) for _, path, size in chosen]


def hub_failure(repo_id, filename, e):
    """The one-line error for a failed hub call, naming what to do about it."""
    what = f"{filename} of {repo_id}" if filename else repo_id
    endpoint = huggingface_hub.constants.ENDPOINT
    if isinstance(e, hub_errors.OfflineModeIsEnabled):
        return UserError(f"cannot download {what}: HF_HUB_OFFLINE is set; unset it (or tokenize the text instead: "
                         "python fineweb.py)")
    if isinstance(e, hub_errors.RepositoryNotFoundError):
        return UserError(f"the hub has no dataset {repo_id} at {endpoint} (or it is private: set HF_TOKEN); name "
                         f"one of {', '.join(SOURCES)}, or a dataset id that exists")
    status = http_status(e)  # a refusal the client wraps as a missing file (LocalEntryNotFoundError) included
    if status == 403:
        return UserError(f"the hub refused {what} at {endpoint} (403 forbidden): the dataset may be gated or private; "
                         "set HF_TOKEN to a token with access (and accept its terms on its page), then rerun")
    if status == 429:
        return UserError(f"the hub rate-limited {what} at {endpoint} (429 too many requests), still after the "
                         "client's retries: wait a few minutes and rerun (it resumes), or pass fewer --jobs")
    if isinstance(e, hub_errors.EntryNotFoundError):
        return UserError(f"{repo_id} at {endpoint} has no file {filename}; check the name and --num_shards")
    if isinstance(e, hub_errors.HfHubHTTPError) and e.response is not None:
        return UserError(f"the hub answered {e.response.status_code} for {what} at {endpoint}, after retries; try "
                         "again later: a rerun resumes where this one stopped")
    return UserError(f"cannot reach the hub at {endpoint} for {what} ({type(e).__name__}): check the network, or "
                     "HF_ENDPOINT if you use a mirror; a rerun resumes where this one stopped")


def http_status(e):
    """The HTTP status of the hub's answer behind an error, looked for down its chain of causes; None without one."""
    while e is not None:
        response = getattr(e, "response", None)
        if response is not None and getattr(response, "status_code", None):
            return response.status_code
        e = e.__cause__ or e.__context__
    return None


class FileBar:
    """What hf_hub_download takes as its tqdm_class: one per file, each adding its bytes to the one shared bar."""

    def __init__(self, shared, lock, **kwargs):
        self.shared, self.lock = shared, lock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        with self.lock:
            self.shared.update(n)

    def close(self):
        pass


class Download:
    """One run of `fineweb.py --pretokenized`: which shards the folder lacks, and fetching them."""

    def __init__(self, args):
        self.args = args
        self.repo_id = SOURCES.get(args.pretokenized, args.pretokenized)
        self.staging = os.path.join(args.out_dir, STAGING)
        self.progress_file = os.path.join(args.out_dir, PROGRESS_NAME)
        self.lock = threading.Lock()  # the progress file and the shared bar, written from several threads
        self.state = self.load_progress()

    def load_progress(self):
        """The progress file's record, or a new one; a folder holding shards not downloaded here is refused."""
        out_dir = self.args.out_dir
        ours = None
        if os.path.exists(self.progress_file):
            try:
                with open(self.progress_file) as f:
                    ours = json.load(f)
                ours["shards"]
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{self.progress_file} is damaged ({type(e).__name__}); delete it and the shards "
                                "beside it, then rerun") from None
            if ours.get("source") != self.repo_id:
                raise UserError(f"{out_dir} holds shards downloaded from {ours.get('source')}, not {self.repo_id}; "
                                "pass --out_dir NEW_DIR")
        recorded = set(ours["shards"]) if ours else set()
        others = sorted(n for n in os.listdir(out_dir) if n.endswith((".npy", ".bin", "_progress.json"))
                        and n not in recorded and n != PROGRESS_NAME)
        if others:
            raise UserError(f"{out_dir} holds files this download did not write ({others[0]}"
                            f"{' ...' if len(others) > 1 else ''}); a folder of tokenized shards is never mixed with "
                            "downloaded ones: pass --out_dir NEW_DIR")
        return ours or {"source": self.repo_id, "shards": {}}

    def intact(self, name):
        """Whether the shard `name` is in the folder as it was recorded."""
        path = os.path.join(self.args.out_dir, name)
        return os.path.exists(path) and common.file_fingerprint(path) == self.state["shards"].get(name)

    def save_progress(self):
        data = json.dumps(self.state, indent=1).encode()
        try:
            common.atomic_write(self.progress_file, lambda f: f.write(data))
        except OSError as e:
            raise UserError(f"could not write {self.progress_file} ({common.write_failure(self.progress_file, e)}); "
                            "free some space, then rerun: it resumes") from None

    def check_space(self, todo):
        """Stop before downloading if the disk cannot hold what is left to fetch."""
        partial = 0
        for root, _, names in os.walk(self.staging):
            partial += sum(os.path.getsize(os.path.join(root, n)) for n in names if n.endswith(".incomplete"))
        need = sum(size for _, size in todo) - partial
        free = shutil.disk_usage(self.args.out_dir).free
        if need > free:
            raise UserError(f"{len(todo)} shards need {need / 1e9:.2f} GB more, and {self.args.out_dir}'s disk has "
                            f"{free / 1e9:.2f} GB free; free some space, or pass a smaller --num_shards")
        return need

    def fetch(self, path, bar_class):
        """One shard: downloaded into the staging folder, checked, then renamed to its final name."""
        name = os.path.basename(path)
        try:
            staged = huggingface_hub.hf_hub_download(self.repo_id, path, repo_type="dataset", local_dir=self.staging,
                                                     tqdm_class=bar_class)
        except OSError as e:
            if e.errno is not None:  # the disk, not the network
                raise UserError(f"could not write {name} into {self.staging} ({common.write_failure(self.staging, e)});"
                                " free some space, then rerun: it resumes") from None
            raise hub_failure(self.repo_id, path, e) from None
        except Exception as e:
            raise hub_failure(self.repo_id, path, e) from None
        problem = common.bin_shard_problem(staged)
        if problem:
            os.remove(staged)
            raise UserError(f"{path} from {self.repo_id} {problem}; it was removed, nothing of it is left in "
                            f"{self.args.out_dir}: the dataset does not hold llm.c GPT-2 shards")
        # recorded first, then renamed: a kill in between leaves a record without its file, which a rerun
        # fetches again (from the staged copy), never a file without its record
        fingerprint = common.file_fingerprint(staged)
        with self.lock:
            self.state["shards"][name] = fingerprint
            self.save_progress()
        os.replace(staged, os.path.join(self.args.out_dir, name))

    def run(self):
        """Fetch what the folder lacks; returns (shards in the folder, shards fetched now, bytes fetched now)."""
        wanted = remote_shards(self.repo_id, self.args.num_shards)
        todo = [(path, size) for path, size in wanted if not self.intact(os.path.basename(path))]
        if not todo:
            return len(wanted), 0, 0
        need = self.check_space(todo)
        damaged = [os.path.basename(p) for p, _ in todo if os.path.basename(p) in self.state["shards"]]
        for name in damaged:  # recorded, but changed or gone since: fetched again
            if os.path.exists(os.path.join(self.args.out_dir, name)):
                os.remove(os.path.join(self.args.out_dir, name))
            del self.state["shards"][name]
        if damaged:
            self.save_progress()
        with tqdm(total=need, unit="B", unit_scale=True, desc=f"{len(todo)} shards from {self.repo_id}") as bar:
            bar_class = functools.partial(FileBar, bar, self.lock)
            with ThreadPoolExecutor(self.args.jobs) as pool:
                futures = [pool.submit(self.fetch, path, bar_class) for path, _ in todo]
                try:
                    for future in futures:
                        future.result()
                except BaseException:
                    for future in futures:  # the transfers under way finish (and stay staged); no new ones
                        future.cancel()
                    raise
        shutil.rmtree(self.staging, ignore_errors=True)  # the transfers' metadata: every shard is in place
        return len(wanted), len(todo), need


def download(args):
    """`fineweb.py --pretokenized`: the shards into args.out_dir (whose lock the caller holds). A Ctrl-C stops
    at once; what is fetched so far stays, and the rerun resumes the rest."""
    previous = signal.getsignal(signal.SIGINT)

    def interrupted(signum, frame):
        # the transfers run in threads that cannot be stopped midway: leave them, the staged parts resume
        print(f"\nfineweb.py: interrupted; rerun the same command to resume ({args.out_dir})", file=sys.stderr,
              flush=True)
        os._exit(130)

    signal.signal(signal.SIGINT, interrupted)
    try:
        return Download(args).run()
    finally:
        signal.signal(signal.SIGINT, previous)
