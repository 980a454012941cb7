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

}  // namespace qlora::tool
