# Adds llama.cpp's llama-bench and llama-server targets to llama-cpp-python's own CMake build,
# so one configure and one compile of ggml (the CUDA kernels are most of the build time) give
# the wheel and both tools, linked to the very libraries the wheel ships.
#
# Use: CMAKE_ARGS="... -DCMAKE_PROJECT_llama.cpp_INCLUDE=<this file>": CMake includes it in
# vendor/llama.cpp's scope right after that folder's project() call. LLAMA_BUILD_TOOLS=ON
# cannot do this: llama-cpp-python adds tools/mtmd itself, so mtmd would be added twice, and
# deferred calls may not add folders. The targets the tools link (llama-common, mtmd,
# cpp-httplib) are defined later and resolved at generate time. The tools build with the
# wheel (their folders are in ALL); llama-server's install rule also puts a copy in the
# wheel's bin/, unused: the checks run the build tree's binaries.
# The web UI is embedded empty (no npm, no download there); the checks pass --no-webui.

set(LLAMA_BUILD_UI OFF)
set(LLAMA_USE_PREBUILT_UI OFF)
add_subdirectory(tools/ui)
add_subdirectory(tools/server)
add_subdirectory(tools/llama-bench)
