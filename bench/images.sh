# Sourced by the bench scripts: remembers the daemon's images now, and `drop_new_images`
# removes every image made since (BuildKit's untagged results, and the dbuild images of
# the bench's temporary caches, which no index names once those are deleted). Do not run
# other builds on the daemon during a bench: their new images would go too.
images_before=$(docker images -aq --no-trunc | sort -u)
drop_new_images() {
  comm -13 <(echo "$images_before") <(docker images -aq --no-trunc | sort -u) \
    | xargs -r docker rmi -f >/dev/null 2>&1 || true
}
