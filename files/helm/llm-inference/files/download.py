# The model-download init container's program (python3 -c, with the inference image's Python: standard library
# only). It fetches MODEL_URL into MODEL_PATH and refuses a file whose sha256 is not MODEL_SHA256.
# - A file already there with that sha256 is kept: nothing is fetched (a cache volume, a restarted pod).
# - An interrupted transfer resumes: the partial file (MODEL_PATH.part) stays, and the next attempt, in this run or
#   after a restart of the container, asks for the rest with an HTTP Range request. A server that ignores the range
#   sends the whole file again. The sha256 covers the whole file either way.
# - MODEL_SIZE (bytes, optional) is the most the volume holds: a larger file is refused before it is written.
# - One writer at a time (a lock file next to the model), for a cache volume shared by several pods.
import fcntl
import hashlib
import os
import sys
import time
import urllib.error
import urllib.request

URL, WANT, DEST = os.environ["MODEL_URL"], os.environ["MODEL_SHA256"].lower(), os.environ["MODEL_PATH"]
SIZE = int(os.environ.get("MODEL_SIZE") or 0)
PART = DEST + ".part"
ATTEMPTS = 6
CHUNK = 1 << 20


class Refused(Exception):
    """An answer that another attempt would not change."""


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest


def total_size(response):
    """The size of the whole file, from Content-Range (206) or Content-Length (200); 0 when not said."""
    if response.status == 206:
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
    else:
        total = response.headers.get("Content-Length", "")
    return int(total) if total.isdigit() else 0


def fetch():
    """Fetch what the partial file lacks; return the sha256 of the whole partial file."""
    offset = os.path.getsize(PART) if os.path.exists(PART) else 0
    digest = sha256(PART) if offset else hashlib.sha256()
    request = urllib.request.Request(URL, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            return digest  # nothing after the offset: the partial file is whole (the sha256 tells)
        if exc.code < 500:
            raise Refused(f"{URL}: HTTP {exc.code} {exc.reason}") from None
        raise
    with response:
        if offset and response.status != 206:
            print(f"{URL}: the server does not resume (HTTP {response.status}), fetching the whole file")
            offset, digest = 0, hashlib.sha256()
        total = total_size(response)
        if SIZE and total > SIZE:
            raise Refused(f"{URL}: the file is {total} bytes, more than the {SIZE} bytes the model's size allows")
        print(f"{URL}: fetching {'from byte ' + str(offset) if offset else 'the whole file'} of {total or '?'}")
        with open(PART, "ab" if offset else "wb") as out:
            for chunk in iter(lambda: response.read(CHUNK), b""):
                offset += len(chunk)
                if SIZE and offset > SIZE:
                    raise Refused(f"{URL}: more than the {SIZE} bytes the model's size allows")
                digest.update(chunk)
                out.write(chunk)
    if total and offset < total:  # http.client ends a cut transfer quietly
        raise ConnectionError(f"the connection closed after {offset} of {total} bytes")
    return digest


def main():
    with open(DEST + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a pod already writing this cache finishes first
        if os.path.exists(DEST) and sha256(DEST).hexdigest() == WANT:
            print(f"{DEST} is already there, sha256 {WANT}")
            return
        for attempt in range(1, ATTEMPTS + 1):
            try:
                got = fetch().hexdigest()
                break
            except Refused as exc:
                sys.exit(str(exc))
            except (OSError, urllib.error.URLError) as exc:
                if attempt == ATTEMPTS:
                    sys.exit(f"{URL}: {exc} (attempt {attempt} of {ATTEMPTS}; the partial file is kept)")
                print(f"{URL}: {exc}; resuming in {2**attempt} s (attempt {attempt} of {ATTEMPTS})", flush=True)
                time.sleep(2**attempt)
        if got != WANT:
            os.remove(PART)
            sys.exit(f"{URL}: sha256 {got}, expected {WANT}")
        os.replace(PART, DEST)
        print(f"downloaded {DEST} ({os.path.getsize(DEST)} bytes), sha256 {got}")


main()
