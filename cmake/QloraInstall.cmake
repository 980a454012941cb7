# Install rules and the CMake package, so that an outside project can
#   find_package(qlora REQUIRED)
#   target_link_libraries(app PRIVATE qlora::backend)   # qlora::qlora for the CPU-only headers
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(QLORA_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/qlora)

install(DIRECTORY include/ DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY models/ DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/qlora/models OPTIONAL FILES_MATCHING PATTERN "*.hpp")
set(_qlora_targets qlora qlora_backend)
if(QLORA_WITH_CUDA)
  list(APPEND _qlora_targets qlora_cuda)
endif()
install(TARGETS ${_qlora_targets} EXPORT qloraTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT qloraTargets NAMESPACE qlora:: DESTINATION ${QLORA_INSTALL_CMAKEDIR})

configure_package_config_file(cmake/qloraConfig.cmake.in ${CMAKE_CURRENT_BINARY_DIR}/qloraConfig.cmake
                              INSTALL_DESTINATION ${QLORA_INSTALL_CMAKEDIR})
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/qloraConfigVersion.cmake
                                 COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/qloraConfig.cmake ${CMAKE_CURRENT_BINARY_DIR}/qloraConfigVersion.cmake
        DESTINATION ${QLORA_INSTALL_CMAKEDIR})
