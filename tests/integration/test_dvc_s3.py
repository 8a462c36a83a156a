"""A team's DVC remote on S3-compatible storage: one clone pushes, a second clone pulls and has nothing to rerun.

The object store is moto's S3 server (`moto[server]`, the `team` extra), a real HTTP S3 API started here on
a free 127.0.0.1 port and stopped after; DVC talks to it through dvc-s3 (s3fs/aiobotocore) exactly as to any
S3-compatible service: the bucket URL and `endpointurl` committed in .dvc/config, the keys only in each
person's environment (here: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the dvc processes' env).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from tests.helpers.postgres import free_port
from tests.helpers.project import git, venv_env
from tests.integration.test_dvc_remote import clone_with_team_data, files_under, nothing_to_rerun, run_dvc

pytestmark = [
    pytest.mark.extended,
    pytest.mark.skipif(importlib.util.find_spec("dvc_s3") is None or importlib.util.find_spec("moto") is None,
                       reason="dvc-s3 / moto are not installed: pip install -c constraints.txt -e '.[test,real,team]'"),
]
BUCKET = "team-dvc"


@pytest.fixture
def s3_server(tmp_path):
    port = free_port()
    log = open(tmp_path / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "moto.log").read_text(errors="replace")
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto's S3 server did not answer"
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def bucket_objects(endpoint: str, env: dict[str, str]) -> dict[str, bytes]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])]
    return {k: s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}


def test_a_push_to_s3_from_one_clone_is_pulled_by_another_with_nothing_to_rerun(tmp_path, s3_server):
    import boto3

    home = tmp_path / "home"  # no ~/.aws of the machine's user
    home.mkdir()
    env = venv_env(HOME=str(home), AWS_ACCESS_KEY_ID="team-key", AWS_SECRET_ACCESS_KEY="team-secret",
                   AWS_DEFAULT_REGION="us-east-1")
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="team-key", aws_secret_access_key="team-secret",
                 region_name="us-east-1").create_bucket(Bucket=BUCKET)
    own_data = b"term\tmeaning\n\xec\xa7\x80\xeb\xac\xb8\tpassage\n"

    a = clone_with_team_data(tmp_path / "a", own_data, env)
    run_dvc(a, "remote", "add", "-d", "team", f"s3://{BUCKET}/dvc", env=env)
    run_dvc(a, "remote", "modify", "team", "endpointurl", s3_server, env=env)
    git(a, "add", "-A")
    git(a, "commit", "-q", "-m", "sample data, glossary, the team's S3 remote")
    committed = git(a, "show", "HEAD:.dvc/config").stdout
    assert f"s3://{BUCKET}/dvc" in committed and "team-secret" not in committed
    run_dvc(a, "push", env=env)

    # In the bucket: every object of A's cache, content-addressed; the glossary's object is its bytes.
    pushed = {k.removeprefix("dvc/files/md5/"): v for k, v in bucket_objects(s3_server, env).items()}
    assert pushed == files_under(a / ".dvc/cache/files/md5")
    lock = yaml.safe_load((a / "dvc.lock").read_text())
    sample_md5 = lock["stages"]["sample_data"]["outs"][0]["md5"]
    assert f"{sample_md5[:2]}/{sample_md5[2:]}" in pushed
    glossary_md5 = yaml.safe_load((a / "data/team/glossary.tsv.dvc").read_text())["outs"][0]["md5"]
    assert pushed[f"{glossary_md5[:2]}/{glossary_md5[2:]}"] == own_data

    # Clone B: git brings the pointers and the remote, dvc pull the data from the bucket.
    git(tmp_path, "clone", "-q", str(a), str(tmp_path / "b"))
    b = tmp_path / "b"
    assert not (b / "data/sample").exists() and not (b / "data/team/glossary.tsv").exists()
    run_dvc(b, "pull", "sample_data", "data/team/glossary.tsv.dvc", env=env)
    assert files_under(b / "data/sample") == files_under(a / "data/sample")
    assert (b / "data/team/glossary.tsv").read_bytes() == own_data
    nothing_to_rerun(b, env)

