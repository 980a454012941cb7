// Crash-safe training: `qlora train` is killed with SIGKILL at seeded random points (at random times, and in
// the middle of a checkpoint write, held open by the QLORA_TEST_CHECKPOINT_DELAY_MS hook of
// train/checkpoint.hpp), then resumed with --resume until it finishes. After every kill each step-*
// directory must be a complete, readable checkpoint (temporaries are ignored), the resume must start from
// the newest of them, and the finished run must hold the same adapter, byte for byte, as an uninterrupted
// run (the CPU trainer is deterministic: trainer.hpp).

#include <doctest/doctest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/io/safetensors.hpp"
#include "qlora/train/checkpoint.hpp"
#include "support/files.hpp"
#include "support/shared_data.hpp"
#include "tool_runner.hpp"

namespace fs = std::filesystem;

namespace {

using qlora::test::kStories260K;
constexpr int kSteps = 6;

std::vector<std::string> train_argv(const fs::path& out, bool resume) {
  std::vector<std::string> a = {QLORA_TOOL, "train", kStories260K.string(), "--tokenizer",
                                qlora::test::kStories260KTokenizer.string(), "--data",
                                qlora::test::kTinyStoriesValid.string(),
                                "--format", "text", "--seq-len", "64", "--adapter", "qblora", "--rank", "4",
                                "--alpha", "8", "--quant", "int4-g32", "--lr", "3e-3", "--batch", "4",
                                "--micro-batch", "2", "--dropout", "0.1", "--save-every", "1", "--steps",
                                std::to_string(kSteps), "--out", out.string()};
  if (resume) a.insert(a.end(), {"--resume", out.string()});
  return a;
}

// fork + exec of the tool with stderr into `log`; `delay_ms` > 0 sets the checkpoint-write hook.
pid_t spawn(const std::vector<std::string>& argv, const fs::path& log, int delay_ms) {
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) ::dup2(fd, 2);
    const int null = ::open("/dev/null", O_WRONLY);
    if (null >= 0) ::dup2(null, 1);
    ::setenv("OMP_NUM_THREADS", "1", 1);
    if (delay_ms > 0) ::setenv("QLORA_TEST_CHECKPOINT_DELAY_MS", std::to_string(delay_ms).c_str(), 1);
    std::vector<char*> args;
    for (const auto& s : argv) args.push_back(const_cast<char*>(s.c_str()));
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  return pid;
}

// Exit status, or -signal when killed.
int wait_for(pid_t pid) {
  int raw = 0;
  REQUIRE(::waitpid(pid, &raw, 0) == pid);
  return WIFEXITED(raw) ? WEXITSTATUS(raw) : -WTERMSIG(raw);
}

bool exited(pid_t pid, int& status) {
  int raw = 0;
  if (::waitpid(pid, &raw, WNOHANG) != pid) return false;
  status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -WTERMSIG(raw);
  return true;
}

// The checkpoint being written, if any: a temporary ".step-N.tmp.PID.K" that holds the tensors but no
// state.json yet ("" when none). An old checkpoint being removed is renamed to such a name too, but keeps its
// state.json until the removal reaches it.
std::string checkpoint_write_in_progress(const fs::path& out) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(out / "checkpoints", ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind(".step-", 0) == 0 && fs::exists(e.path() / "optimizer.safetensors", ec) &&
        !fs::exists(e.path() / "state.json", ec))
      return name;
  }
  return "";
}

// Every step-* directory is a complete checkpoint that opens; returns the newest step (0 if none).
std::int64_t check_checkpoints(const fs::path& out) {
  std::int64_t newest = 0;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(out / "checkpoints", ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind(".", 0) == 0) continue;  // a temporary: never read by resume
    CAPTURE(e.path());
    REQUIRE(name.rfind("step-", 0) == 0);
    const auto state = nlohmann::json::parse(qlora::test::read_raw(e.path() / "state.json"));
    const std::int64_t step = state.at("step");
    CHECK(fs::path(qlora::train::checkpoint_dir(out, step)).filename() == name);
    CHECK_NOTHROW(qlora::io::SafetensorsFile(e.path() / "adapter.safetensors"));
    CHECK_NOTHROW(qlora::io::SafetensorsFile(e.path() / "optimizer.safetensors"));
    newest = std::max(newest, step);
  }
  const auto latest = qlora::train::latest_checkpoint(out);
  CHECK(latest.has_value() == (newest > 0));
  if (latest) CHECK(*latest == qlora::train::checkpoint_dir(out, newest));
  return newest;
}

}  // namespace

TEST_CASE("crash resume: SIGKILL at random points and inside checkpoint writes, then --resume, gives the uninterrupted adapter") {
  if (!qlora::test::shared_file_present(kStories260K)) return;
  const fs::path straight = qlora::test::fresh_output_path("crash-straight");
  const fs::path log = qlora::test::fresh_output_path("crash-log.txt");
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(wait_for(spawn(train_argv(straight, false), log, 0)) == 0);
  const double uninterrupted_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const std::string expected = qlora::test::read_raw(straight / "adapter/adapter.safetensors");
  REQUIRE(!expected.empty());

  std::mt19937 rng(20261124);  // seeded: the kill points are the same on every run of the test
  for (int scenario = 0; scenario < 4; ++scenario) {
    const fs::path out = qlora::test::fresh_output_path("crash-" + std::to_string(scenario));
    int kills = 0;
    bool started = false, finished = false, killed_in_write = false;
    std::int64_t newest = 0;
    // Two kills per scenario: scenarios 0 and 1 at random times, 2 and 3 first inside a checkpoint write.
    for (int attempt = 0; attempt < 2 && !finished; ++attempt) {
      const bool in_write = scenario >= 2 && attempt == 0;
      const pid_t pid = spawn(train_argv(out, started), log, in_write ? 1500 : 0);
      int k = 0, status = 0;
      if (in_write) {
        // Wait for the k-th checkpoint write of this process (k random); kill while it sleeps before state.json.
        k = std::uniform_int_distribution<int>(1, kSteps - 1)(rng);
        std::set<std::string> writes;  // temporaries are unique names: one per write
        for (;;) {
          REQUIRE_FALSE(exited(pid, status));
          const std::string writing = checkpoint_write_in_progress(out);
          if (!writing.empty()) writes.insert(writing);
          if (!writing.empty() && int(writes.size()) == k) break;
          std::this_thread::sleep_for(std::chrono::milliseconds(2));
        }
      } else {
        std::this_thread::sleep_for(std::chrono::duration<double>(std::uniform_real_distribution<double>(0.05, 0.7)(rng) *
                                                                  uninterrupted_s));
      }
      if (exited(pid, status)) {  // finished before the kill point
        REQUIRE(status == 0);
        finished = true;
        break;
      }
      ::kill(pid, SIGKILL);
      REQUIRE(wait_for(pid) == -SIGKILL);
      ++kills;
      killed_in_write = killed_in_write || in_write;
      started = fs::exists(out);
      newest = fs::exists(out / "checkpoints") ? check_checkpoints(out) : 0;
      // The checkpoint being written is not one; the one before it (when there is one) is the newest.
      if (in_write) CHECK(newest == k - 1);
      MESSAGE("scenario " << scenario << ": killed " << (in_write ? "inside checkpoint write " + std::to_string(k) : "at a random time")
                          << "; newest complete checkpoint: step " << newest);
      if (started && newest == 0) {
        // Killed before the first checkpoint: --resume refuses with a clear line, and the run starts over.
        CHECK(wait_for(spawn(train_argv(out, true), log, 0)) != 0);
        CHECK(qlora::test::read_raw(log).find("no complete checkpoint") != std::string::npos);
        fs::remove_all(out);
        started = false;
      }
    }
    if (!finished) {
      const int status = wait_for(spawn(train_argv(out, started), log, 0));
      const std::string err = qlora::test::read_raw(log);
      INFO(err);
      REQUIRE(status == 0);
      // The resume started from the newest complete checkpoint.
      if (started)
        CHECK(err.find("resumed from " + qlora::train::checkpoint_dir(out, newest).string() + " at step " +
                       std::to_string(newest)) != std::string::npos);
    }
    CHECK(qlora::test::read_raw(out / "adapter/adapter.safetensors") == expected);
    check_checkpoints(out);
    if (killed_in_write)  // the next save removed the temporary the killed write left behind
      for (const auto& e : fs::directory_iterator(out / "checkpoints"))
        CHECK_MESSAGE(e.path().filename().string().rfind(".", 0) != 0, e.path());
    MESSAGE("scenario " << scenario << ": " << kills << " kill(s); final adapter identical to the uninterrupted run");
  }
}
