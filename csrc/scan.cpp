// Listing image folders with one getdents pass and one fstatat per image (relative to the
// directory's descriptor, so the kernel does not walk the path again). rela's ImageFolder lists
// many directories at once on a thread pool: on a cold cache the stats wait on the disk, and
// several outstanding requests hide that wait.
#include "scan.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <numeric>

namespace rela {

static bool has_extension(const char* name, size_t len, const std::vector<std::string>& extensions) {
  for (const auto& ext : extensions) {
    if (ext.size() > len) continue;
    const char* tail = name + len - ext.size();
    bool same = true;
    for (size_t i = 0; i < ext.size() && same; ++i)
      same = std::tolower(static_cast<unsigned char>(tail[i])) == ext[i];
    if (same) return true;
  }
  return false;
}

// Sort paths by bytes and apply the same order to `sizes` (when given).
static void sort_together(std::vector<std::string>& paths, std::vector<int64_t>* sizes) {
  std::vector<size_t> order(paths.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return paths[a] < paths[b]; });
  std::vector<std::string> p;
  p.reserve(paths.size());
  for (size_t i : order) p.push_back(std::move(paths[i]));
  paths.swap(p);
  if (sizes) {
    std::vector<int64_t> s;
    s.reserve(order.size());
    for (size_t i : order) s.push_back((*sizes)[i]);
    sizes->swap(s);
  }
}

DirListing list_dir(const std::string& root, const std::string& rel,
                    const std::vector<std::string>& extensions) {
  DirListing out;
  const std::string path = rel.empty() ? root : root + "/" + rel;
  const std::string prefix = rel.empty() ? std::string() : rel + "/";
  const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    out.error = path + "\t" + std::to_string(errno);
    return out;
  }
  struct stat self {};
  if (::fstat(fd, &self) == 0) {
    out.mtime_ns = static_cast<int64_t>(self.st_mtim.tv_sec) * 1000000000 + self.st_mtim.tv_nsec;
    out.inode = static_cast<int64_t>(self.st_ino);
    out.device = static_cast<int64_t>(self.st_dev);
  }
  DIR* dir = ::fdopendir(fd);  // owns fd from here on
  if (!dir) {
    out.error = path + "\t" + std::to_string(errno);
    ::close(fd);
    return out;
  }
  while (const dirent* e = ::readdir(dir)) {
    const char* name = e->d_name;
    if (name[0] == '.') continue;  // ".", "..", and hidden entries
    const size_t len = std::char_traits<char>::length(name);
    bool is_dir = e->d_type == DT_DIR, is_link = e->d_type == DT_LNK;
    struct stat st {};
    bool stat_done = false, stat_ok = false;
    if (e->d_type == DT_LNK || e->d_type == DT_UNKNOWN) {  // follow the link / learn the type
      stat_done = true;
      stat_ok = ::fstatat(fd, name, &st, 0) == 0;
      is_dir = stat_ok && S_ISDIR(st.st_mode);
      if (e->d_type == DT_UNKNOWN) {
        struct stat lst {};
        is_link = ::fstatat(fd, name, &lst, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(lst.st_mode);
      }
    }
    if (is_dir) {
      out.subdirs.push_back(prefix + name);
      out.links.push_back(is_link ? 1 : 0);
      continue;
    }
    if (!has_extension(name, len, extensions)) {
      out.others.push_back(prefix + name);
      continue;
    }
    if (!stat_done) stat_ok = ::fstatat(fd, name, &st, 0) == 0;
    if (!stat_ok) {
      out.error = path + "/" + name + "\t" + std::to_string(errno);
      break;
    }
    out.images.push_back(prefix + name);
    out.sizes.push_back(static_cast<int64_t>(st.st_size));
  }
  ::closedir(dir);
  sort_together(out.images, &out.sizes);
  sort_together(out.others, nullptr);
  return out;
}

}  // namespace rela
