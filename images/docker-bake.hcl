# Builds and tags both images: docker buildx bake -f images/docker-bake.hcl [--push]
#   REGISTRY=ghcr.io/you TAG=0.1.0 docker buildx bake -f images/docker-bake.hcl --push
# TAG defaults to the package version, which the generated WorkflowTemplate names.
variable "REGISTRY" {
  default = "m3tune"
}

variable "TAG" {
  default = "0.1.0"
}

group "default" {
  targets = ["cpu", "cuda"]
}

target "cpu" {
  context    = "."
  dockerfile = "images/Dockerfile.cpu"
  tags       = ["${REGISTRY}/m3tune-cpu:${TAG}"]
}

target "cuda" {
  context    = "."
  dockerfile = "images/Dockerfile.cuda"
  tags       = ["${REGISTRY}/m3tune-cuda:${TAG}"]
}
