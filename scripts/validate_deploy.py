#!/usr/bin/env python3
"""Checks the deployment files (README: "On Kubernetes", "With docker compose").

- Every Kubernetes resource under deploy/kubernetes/ against the Kubernetes API
  schemas, strictly (unknown fields fail), with `kubernetes-validate` from PyPI.
- kustomization.yaml lists exactly the resource files there are.
- deploy/compose.yaml: every service has the image and a command, and every
  service a command or depends_on names (ws://NAME:PORT, depends_on) exists.
- With --tether BIN: every container's command line parses with that binary's own
  flags (`BIN ARGS --help`: clap rejects an unknown flag or a bad value first).

Usage: python validate_deploy.py [--tether BIN] [repo root]; exits non-zero if anything failed.
"""
import argparse
import pathlib
import re
import subprocess
import sys

import yaml

cli = argparse.ArgumentParser()
cli.add_argument("--tether", help="a built tether binary to parse every command line with")
cli.add_argument("root", nargs="?", default=pathlib.Path(__file__).parent.parent)
opts = cli.parse_args()
root = pathlib.Path(opts.root)
kube = root / "deploy" / "kubernetes"
failures = []
command_lines = []  # (where, args)

resources = sorted(p.name for p in kube.glob("*.yaml") if p.name != "kustomization.yaml")
kustomization = yaml.safe_load((kube / "kustomization.yaml").read_text())
if sorted(kustomization.get("resources", [])) != resources:
    failures.append(f"kustomization.yaml lists {kustomization.get('resources')}, the folder has {resources}")
result = subprocess.run(
    [str(pathlib.Path(sys.executable).parent / "kubernetes-validate"), "--strict",
     *[str(kube / r) for r in resources]],
    capture_output=True, text=True,
)
print(result.stdout.strip())
if result.returncode != 0:
    failures.append(f"kubernetes-validate failed:\n{result.stdout}{result.stderr}")
for r in resources:
    for doc in yaml.safe_load_all((kube / r).read_text()):
        for c in (doc or {}).get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            if c.get("image") != "tether":
                failures.append(f"{r}: container {c.get('name')} uses {c.get('image')}, not the kustomized `tether`")
            command_lines.append((f"{r}: {doc['metadata']['name']}", c.get("args", [])))

compose = yaml.safe_load((root / "deploy" / "compose.yaml").read_text())
services = compose.get("services", {})
for name, s in services.items():
    if not s.get("image") or not isinstance(s.get("command"), list):
        failures.append(f"compose service {name}: needs the image and a command list")
        continue
    named = re.findall(r"wss?://([a-z0-9-]+):\d+", " ".join(s["command"]))
    for other in named + list(s.get("depends_on", [])):
        if other not in services:
            failures.append(f"compose service {name} names {other}, which is not a service")
    command_lines.append((f"compose service {name}", s["command"]))
print(f"compose: {len(services)} services checked")

if opts.tether:
    for where, args in command_lines:
        parsed = subprocess.run([opts.tether, *args, "--help"], capture_output=True, text=True)
        if parsed.returncode != 0:
            failures.append(f"{where}: `tether {' '.join(args)}` does not parse:\n{parsed.stderr}")
    print(f"command lines: {len(command_lines)} parsed by {opts.tether}")

if failures:
    print("\n".join(failures), file=sys.stderr)
    sys.exit(1)
print("deployment files: ok")
