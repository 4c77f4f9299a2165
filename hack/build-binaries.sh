#!/usr/bin/env bash
# Build the pinned third-party binaries the integration tests run (S3 server, Kubernetes control plane,
# helm, kubeconform, Prometheus) from their Go modules into a cache outside the repository.
#
#   hack/build-binaries.sh            # build everything that is missing
#   hack/build-binaries.sh etcd helm  # build only the named binaries
#
# Output: ${DATACREDIT_CACHE:-$HOME/.cache/datacredit}/bin/<name>-<version> plus a <name> symlink to it.
# GOMODCACHE and GOCACHE live under the same cache directory so CI can restore them between runs.
# Binaries that already exist are skipped; delete the versioned file to force a rebuild.
set -euo pipefail

MINIO_VERSION=v0.0.0-20260212201848-7aac2a2c5b7c # github.com/minio/minio (no semver tags; pseudo-version)
ETCD_VERSION=v3.6.16
KUBERNETES_VERSION=v1.34.4
HELM_VERSION=v3.19.0
KUBECONFORM_VERSION=v0.7.0
PROMETHEUS_VERSION=v0.316.0 # Go module version of Prometheus 3.16.0

CACHE_DIR="${DATACREDIT_CACHE:-$HOME/.cache/datacredit}"
BIN_DIR="$CACHE_DIR/bin"
GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
if [[ ! -x "$GO" ]]; then
  echo "error: no Go toolchain found; install Go >= 1.26 or set GO=/path/to/go" >&2
  exit 1
fi

export GOMODCACHE="$CACHE_DIR/gomod"
export GOCACHE="$CACHE_DIR/gocache"
export GOTOOLCHAIN=local
export CGO_ENABLED=0
export GOFLAGS="-buildvcs=false"
mkdir -p "$BIN_DIR" "$GOMODCACHE" "$GOCACHE"

WORK_DIR="$(mktemp -d)"
trap 'rm -rf "$WORK_DIR"' EXIT

SUMMARY=()

log() { printf '[build-binaries %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# new_module DIR: create an empty throw-away main module in DIR.
new_module() {
  mkdir -p "$1"
  (cd "$1" && "$GO" mod init datacredit.local/buildtools >/dev/null 2>&1)
}

# fetch_tools DIR PKG@VERSION...: record the main packages as tools of the module (go.mod + go.sum).
fetch_tools() {
  local dir="$1"
  shift
  (cd "$dir" && "$GO" get -tool "$@")
}

# build NAME VERSION DIR PKG [TAGS] [EXTRA_LDFLAGS]: go build PKG inside module DIR into the cache.
build() {
  local name="$1" version="$2" dir="$3" pkg="$4" tags="${5:-}" extra_ldflags="${6:-}"
  local out="$BIN_DIR/$name-$version"
  local start=$SECONDS
  log "building $name $version ($pkg${tags:+, tags $tags})"
  (cd "$dir" && "$GO" build -p 2 -trimpath -tags "$tags" -ldflags "-s -w $extra_ldflags" -o "$out.tmp" "$pkg")
  mv -f "$out.tmp" "$out"
  ln -sfn "$(basename "$out")" "$BIN_DIR/$name"
  SUMMARY+=("$(printf '%-24s %-40s %5ds' "$name" "$version" $((SECONDS - start)))")
  log "built $out in $((SECONDS - start))s"
}

# wanted NAME VERSION: true when NAME was requested and is not built yet (refreshes the symlink otherwise).
wanted() {
  local name="$1" version="$2"
  if ((${#REQUESTED[@]})) && [[ " ${REQUESTED[*]} " != *" $name "* ]]; then
    return 1
  fi
  if [[ -x "$BIN_DIR/$name-$version" ]]; then
    ln -sfn "$name-$version" "$BIN_DIR/$name"
    SUMMARY+=("$(printf '%-24s %-40s %s' "$name" "$version" "cached")")
    return 1
  fi
  return 0
}

build_minio() {
  wanted minio "$MINIO_VERSION" || return 0
  local dir="$WORK_DIR/minio" start=$SECONDS
  new_module "$dir"
  fetch_tools "$dir" "github.com/minio/minio@$MINIO_VERSION"
  log "fetched minio modules in $((SECONDS - start))s"
  build minio "$MINIO_VERSION" "$dir" github.com/minio/minio
}

build_etcd() {
  wanted etcd "$ETCD_VERSION" || return 0
  # server/v3's go.mod replaces its sibling modules with ../ paths, so `go install` refuses it;
  # a throw-away main module resolves the published siblings at the same version instead.
  local dir="$WORK_DIR/etcd"
  new_module "$dir"
  fetch_tools "$dir" "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  build etcd "$ETCD_VERSION" "$dir" go.etcd.io/etcd/server/v3 "" \
    "-X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION"
}

# build_kubernetes NAME...: build k8s.io/kubernetes/cmd/NAME for each NAME.
build_kubernetes() {
  local names=() name
  for name in "$@"; do
    if wanted "$name" "$KUBERNETES_VERSION"; then names+=("$name"); fi
  done
  ((${#names[@]})) || return 0
  # k8s.io/kubernetes replaces every k8s.io/* staging module with ./staging/src/...; those directories
  # are not part of the module zip. Re-create the replaces in a throw-away module, pointing each staging
  # module at its published v0.X.Y tag (the same source, released from the same commit).
  local dir="$WORK_DIR/kubernetes" start=$SECONDS staging_version="v0${KUBERNETES_VERSION#v1}"
  new_module "$dir"
  local gomod
  gomod="$(cd "$dir" && "$GO" mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
  local module edits=()
  while read -r module; do
    edits+=("-replace=$module=$module@$staging_version")
  done < <(sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\) => \./staging/src/.*#\1#p' "$gomod")
  if ((${#edits[@]} < 20)); then
    echo "error: expected the k8s.io staging replaces in $gomod, found ${#edits[@]}" >&2
    exit 1
  fi
  (cd "$dir" && "$GO" mod edit "${edits[@]}")
  local pkgs=()
  for name in "${names[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$name@$KUBERNETES_VERSION"); done
  fetch_tools "$dir" "${pkgs[@]}"
  log "fetched kubernetes modules (${#edits[@]} staging replaces) in $((SECONDS - start))s"
  local minor="${KUBERNETES_VERSION#v1.}"
  minor="${minor%%.*}"
  local ldflags="" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  for name in "${names[@]}"; do
    build "$name" "$KUBERNETES_VERSION" "$dir" "k8s.io/kubernetes/cmd/$name" "" "$ldflags"
  done
}

build_helm() {
  wanted helm "$HELM_VERSION" || return 0
  local dir="$WORK_DIR/helm"
  new_module "$dir"
  fetch_tools "$dir" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  build helm "$HELM_VERSION" "$dir" helm.sh/helm/v3/cmd/helm "" \
    "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
}

build_kubeconform() {
  wanted kubeconform "$KUBECONFORM_VERSION" || return 0
  local dir="$WORK_DIR/kubeconform"
  new_module "$dir"
  fetch_tools "$dir" "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"
  build kubeconform "$KUBECONFORM_VERSION" "$dir" github.com/yannh/kubeconform/cmd/kubeconform "" \
    "-X main.version=$KUBECONFORM_VERSION"
}

build_prometheus() {
  local names=() name
  for name in prometheus promtool; do
    if wanted "$name" "$PROMETHEUS_VERSION"; then names+=("$name"); fi
  done
  ((${#names[@]})) || return 0
  # remove_all_sd keeps only static/file/http service discovery (the tests scrape static targets) and
  # drops the cloud SDKs; without the builtinassets tag the web UI is absent but the HTTP API works.
  local dir="$WORK_DIR/prometheus" pkgs=()
  new_module "$dir"
  for name in "${names[@]}"; do pkgs+=("github.com/prometheus/prometheus/cmd/$name@$PROMETHEUS_VERSION"); done
  fetch_tools "$dir" "${pkgs[@]}"
  # Prometheus 3.X.Y is tagged v0.3XX.Y for Go modules (v0.316.0 is 3.16.0).
  local minor="${PROMETHEUS_VERSION#v0.}"
  minor="${minor%%.*}"
  local release="$((minor / 100)).$((minor % 100)).${PROMETHEUS_VERSION##*.}"
  for name in "${names[@]}"; do
    build "$name" "$PROMETHEUS_VERSION" "$dir" "github.com/prometheus/prometheus/cmd/$name" remove_all_sd \
      "-X github.com/prometheus/common/version.Version=$release"
  done
}

REQUESTED=("$@")
KNOWN=" minio etcd kube-apiserver kube-controller-manager kubectl helm kubeconform prometheus promtool "
for name in "${REQUESTED[@]}"; do
  if [[ "$KNOWN" != *" $name "* ]]; then
    echo "error: unknown binary '$name'; known:$KNOWN" >&2
    exit 2
  fi
done

TOTAL_START=$SECONDS
log "cache $CACHE_DIR, $("$GO" version)"
# S3 and the control plane first: most tests need them; then the chart and observability tools.
build_minio
build_etcd
build_kubernetes kube-apiserver kube-controller-manager
build_helm
build_kubeconform
build_prometheus
# kubectl is only for debugging by hand (export KUBECONFIG=...; kubectl get pods -A): built when asked for by name.
if [[ " ${REQUESTED[*]} " == *" kubectl "* ]]; then build_kubernetes kubectl; fi

log "summary (binaries in $BIN_DIR):"
printf '  %s\n' "${SUMMARY[@]}"
log "total $((SECONDS - TOTAL_START))s"
