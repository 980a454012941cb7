#pragma once
// Runs the built qlora binary (QLORA_TOOL) as a user would, with stdout and stderr captured, alone or under
// mpirun (QLORA_MPIRUN, where the build has MPI): shared by the end-to-end tests of the tool.

#include <doctest/doctest.h>
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

// Whether this build can start the tool under mpirun; otherwise the test's skip line.
inline bool mpirun_available() {
#if defined(QLORA_MPIRUN)
  return true;
#else
  MESSAGE("skipped: built without MPI");
  return false;
#endif
}

// The launcher for run_qlora that starts `ranks` processes: QLORA_MPIRUN (tests/CMakeLists.txt: mpiexec, its
// flags, then the process-count flag) and the count. Without MPI a command that fails, so that a test which
// forgot mpirun_available() fails rather than running one process.
inline std::string mpirun(int ranks) {
#if defined(QLORA_MPIRUN)
  return std::string(QLORA_MPIRUN) + " " + std::to_string(ranks);
#else
  return "false " + std::to_string(ranks);
#endif
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
