#pragma once
// The subcommands of the qlora tool, each in its own cmd_<name>.cpp, registered from main.cpp.

#include <CLI/CLI.hpp>

namespace qlora::tool {

void register_info(CLI::App& app);      // cmd_info.cpp
void register_generate(CLI::App& app);  // cmd_generate.cpp

}  // namespace qlora::tool
