"""lina.commands"""
