#pragma once
// The subcommands of the qlora tool, each in its own cmd_<name>.cpp, registered from main.cpp.

#include <CLI/CLI.hpp>

namespace qlora::tool {

void register_info(CLI::App& app);      // cmd_info.cpp
void register_generate(CLI::App& app);  // cmd_generate.cpp
void register_train(CLI::App& app);     // cmd_train.cpp
void register_eval(CLI::App& app);      // cmd_eval.cpp
void register_demo(CLI::App& app);      // cmd_demo.cpp
void register_export(CLI::App& app);    // cmd_export.cpp
void register_quantize(CLI::App& app);  // cmd_quantize.cpp

// The tool's version (`qlora --version`, recorded in the directories it writes).
inline constexpr const char* kToolVersion = "0.1.0";

}  // namespace qlora::tool
