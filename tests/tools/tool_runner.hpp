#pragma once
// Runs the built qlora binary (QLORA_TOOL) as a user would, with stdout and stderr captured: shared by the
// end-to-end tests of the tool.

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>

namespace qlora::test {

struct ToolResult {
  int status = -1;  // exit status, -1 when killed by a signal
  std::string out, err;
};

// `launcher` goes before the binary (e.g. "mpirun -n 2").
inline ToolResult run_qlora(const std::string& args, const std::string& launcher = "") {
  static int counter = 0;
  const std::filesystem::path err_file = std::filesystem::temp_directory_path() /
                                         ("qlora-tool-err-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
  // One OpenMP thread: ctest runs these beside other tests, and the tiny models gain nothing from more.
  const std::string command = "OMP_NUM_THREADS=1 " + launcher + (launcher.empty() ? "" : " ") + std::string(QLORA_TOOL) +
                              " " + args + " 2> " + err_file.string();
  ToolResult r;
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) throw std::runtime_error("popen failed: " + command);
  std::array<char, 4096> buffer{};
  while (std::fgets(buffer.data(), int(buffer.size()), pipe)) r.out += buffer.data();
  const int raw = ::pclose(pipe);
  r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  std::ifstream in(err_file);
  std::stringstream s;
  s << in.rdbuf();
  r.err = s.str();
  std::filesystem::remove(err_file);
  return r;
}

// A path for one test's output under a per-process directory: removed if it exists, its parent created.
inline std::filesystem::path fresh_output_path(const std::string& name) {
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("qlora-tool-test-" + std::to_string(::getpid())) / name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir.parent_path());
  return dir;
}

}  // namespace qlora::test
