#!/usr/bin/env bash
# Publish a released site folder to a gh-pages branch with plain git (what `atlas deploy --config FILE`, and so
# `make deploy`, runs after releasing the config's site_dir).
#
#   bash scripts/deploy.sh [SITE_DIR]            # default: site
#
# Only a release is published: the site must have been rendered with site_url (citations need absolute URLs) and
# stamped by `atlas release` with a release whose manifest matches every data file it holds
# (`atlas release --verify SITE_DIR`); otherwise deploy stops with one line saying what to run.
#
# The site becomes one new commit on the local gh-pages branch (parented on the previous one, so history is kept),
# built from a temporary index: the working tree, the index and the checked-out branch are never touched. The
# branch is then pushed to $ATLAS_DEPLOY_REMOTE (default origin). Nothing is committed when the site is unchanged.
# Release manifests (releases/{id}/manifest.json.gz) already published that the site lacks (built from a fresh
# clone or in CI, with an empty release_dir) are carried over from the previous commit: old citations name them.
#
# The file:// twins of the data files (*.json.js) are left out: the published site fetches the .json files over
# https, and leaving the twins out keeps a GPT-2-small atlas within GitHub Pages' 1 GB. Set ATLAS_DEPLOY_FILE_COPIES=1
# to publish them too.
#
# Environment:
#   ATLAS_DEPLOY_REMOTE   remote to push to (default origin); any git remote or path, so a local bare repository
#                         works for testing without network
#   ATLAS_DEPLOY_BRANCH   branch (default gh-pages)
#   ATLAS_DEPLOY_PUSH     0 to commit locally without pushing
#   ATLAS                 the atlas command (default: this repository's .venv/bin/atlas, else atlas on PATH)
#
# Alternative: .github/workflows/pages.yml builds the site in GitHub Actions and deploys it with
# actions/upload-pages-artifact + actions/deploy-pages (set the repository's Pages source to "GitHub Actions").
set -euo pipefail

site=${1:-site}
remote=${ATLAS_DEPLOY_REMOTE:-origin}
branch=${ATLAS_DEPLOY_BRANCH:-gh-pages}

if [ ! -f "$site/index.html" ]; then
    echo "deploy: no rendered site at '$site' (missing $site/index.html); run \`make site\` first" >&2
    exit 2
fi
# A release, not a working build: rendered with site_url, stamped, every data file as the release's manifest says.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
atlas=${ATLAS:-$repo/.venv/bin/atlas}
[ -x "$atlas" ] || atlas=atlas
if ! problem=$("$atlas" release --verify "$site" 2>&1 >/dev/null); then
    echo "deploy: ${problem#Error: }" >&2
    exit 2
fi
git rev-parse --git-dir >/dev/null 2>&1 || { echo "deploy: not inside a git repository" >&2; exit 2; }
site_abs=$(cd "$site" && pwd)

# Commit identity for machines without one configured (CI runners).
export GIT_AUTHOR_NAME=${GIT_AUTHOR_NAME:-$(git config user.name || echo "Neuron Atlas deploy")}
export GIT_AUTHOR_EMAIL=${GIT_AUTHOR_EMAIL:-$(git config user.email || echo "atlas-deploy@localhost")}
export GIT_COMMITTER_NAME=${GIT_COMMITTER_NAME:-$GIT_AUTHOR_NAME}
export GIT_COMMITTER_EMAIL=${GIT_COMMITTER_EMAIL:-$GIT_AUTHOR_EMAIL}

index=$(mktemp)
trap 'rm -f "$index"' EXIT
rm -f "$index"  # git wants to create the index itself
export GIT_INDEX_FILE=$index

pathspec=(.)
if [ "${ATLAS_DEPLOY_FILE_COPIES:-0}" != 1 ]; then
    pathspec+=(':(exclude,glob)**/*.json.js')
fi
# --force: the repository's .gitignore lists site/; here site/ is the whole tree.
git --work-tree="$site_abs" add --all --force -- "${pathspec[@]}"

parent=$(git rev-parse -q --verify "refs/heads/$branch^{commit}" || true)
local_parent=$parent
if [ -z "$parent" ] && [ "${ATLAS_DEPLOY_PUSH:-1}" != 0 ]; then
    # A fresh clone may only have the remote's branch.
    if git fetch -q "$remote" "$branch" 2>/dev/null; then
        parent=$(git rev-parse -q --verify "FETCH_HEAD^{commit}" || true)
    fi
fi
# Old citations name releases/{id}/manifest.json.gz: a site built where release_dir lacks the old releases (a fresh
# clone, CI) would drop them. A release's manifest never changes, so the published ones the site lacks are kept.
if [ -n "$parent" ]; then
    top=$(git rev-parse --show-toplevel)  # the index's paths are the site's, not relative to the working directory
    kept=0
    while IFS=$'\t' read -r meta path; do
        if [ -z "$(git -C "$top" ls-files --cached -- "$path")" ]; then
            git -C "$top" update-index --add --cacheinfo "100644,${meta##* },$path"
            kept=$((kept + 1))
        fi
    done < <(git ls-tree -r --full-tree "$parent" -- releases/ | grep -E $'\treleases/[^/]+/manifest\\.json\\.gz$' || true)
    [ "$kept" = 0 ] || echo "deploy: kept $kept published release manifests that $site lacks" >&2
fi
tree=$(git write-tree)
if [ -n "$parent" ] && [ "$(git rev-parse "$parent^{tree}")" = "$tree" ]; then
    echo "deploy: $site is already published on $branch; nothing to publish" >&2
    exit 0
fi

source_rev=$(git rev-parse --short HEAD 2>/dev/null || echo "no commit")
commit=$(git commit-tree "$tree" ${parent:+-p "$parent"} -m "Publish atlas site (from $source_rev)")
git update-ref "refs/heads/$branch" "$commit" ${local_parent:+"$local_parent"}
echo "deploy: committed $(git rev-parse --short "$commit") on $branch" >&2

if [ "${ATLAS_DEPLOY_PUSH:-1}" != 0 ]; then
    git push -q "$remote" "refs/heads/$branch:refs/heads/$branch"
    echo "deploy: pushed $branch to $remote" >&2
fi
